// CelerInfer: a header-only float32 forward for the MiniMind family.
// Read forward.hpp top to bottom; ops.hpp has one function per op; model.hpp binds weights.
#pragma once
#include "check.hpp"
#include "model.hpp"
#include "ops.hpp"
#include "trace.hpp"
#include "forward.hpp"
