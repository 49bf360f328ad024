// CelerInfer: a header-only float32 forward for the MiniMind family.
// Read forward.hpp top to bottom; ops.hpp has one function per op (readable kernels), fast.hpp
// the fast kernels; model.hpp binds weights; trace.hpp is the trace hook.
#pragma once
#include "check.hpp"
#include "model.hpp"
#include "ops.hpp"
#include "trace.hpp"
#include "fast.hpp"
#include "forward.hpp"
