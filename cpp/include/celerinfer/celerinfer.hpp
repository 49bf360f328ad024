// CelerInfer: a header-only float32 forward for the MiniMind family.
// Read forward.hpp top to bottom; ops.hpp has one function per op, readable.hpp and fast.hpp the
// two built-in kernel sets, kernel_set.hpp registers them by name; model.hpp binds weights,
// workspace.hpp holds every buffer, trace.hpp is the trace hook; read_probe.hpp times the
// read bandwidth beside a decode (bench).
#pragma once
#include "check.hpp"
#include "model.hpp"
#include "ops.hpp"
#include "trace.hpp"
#include "workspace.hpp"
#include "readable.hpp"
#include "fast.hpp"
#include "read_probe.hpp"
#include "reduced.hpp"
#include "forward.hpp"
#include "kernel_set.hpp"
