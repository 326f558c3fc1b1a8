-- tessera.runtime — threads, memory statistics, devices and version.
local core = require 'tessera.core'
local ffi, C, T = core.ffi, core.C, core.T

T.__version__ = core.version
T.abi_version = C.tessera_abi_version()

-- CPU kernel threads and OpenBLAS threads are set together (n <= 0: every core).
function T.set_num_threads(n) C.ts_set_num_threads(core.int(n, 'set_num_threads')) end
function T.get_num_threads() return C.ts_get_num_threads() end

-- {live = bytes held by tensors, peak = max live since start or reset_peak, reserved, allocs}
function T.memory_stats(device)
  local s = ffi.new('ts_memory_stats')
  core.check(C.ts_memory_stats_get(core.device(device, 'memory_stats'), s))
  return { live = tonumber(s.live_bytes), peak = tonumber(s.peak_bytes),
           reserved = tonumber(s.reserved_bytes), allocs = tonumber(s.num_allocs) }
end
function T.reset_peak_memory(device) C.ts_memory_reset_peak(core.device(device, 'reset_peak_memory')) end
-- Gives the allocator's cached blocks back to the system.
function T.empty_cache(device) core.check(C.ts_memory_empty_cache(core.device(device, 'empty_cache'))) end

T.cuda = {}
function T.cuda.is_compiled() return C.ts_cuda_compiled() ~= 0 end
function T.cuda.device_count() return C.ts_cuda_device_count() end
function T.cuda.is_available() return C.ts_cuda_device_count() > 0 end
function T.cuda.synchronize(index) core.check(C.ts_cuda_synchronize(index or 0)) end
function T.cuda.memory_stats(index) return T.memory_stats('cuda:' .. (index or 0)) end
function T.cuda.empty_cache(index) T.empty_cache('cuda:' .. (index or 0)) end

-- Out of device memory, the CUDA allocator first gives its cached blocks back; when that is not
-- enough it calls this hook once before its last retry: a full collection frees the device memory
-- of tensors that only unreachable Lua values still hold (their finalizers only queue the blocks,
-- which the allocator takes back before retrying). The hook runs on the allocating thread, inside
-- the failing call, and only when that is the thread that registered it (this Lua state's).
-- Caveat: LuaJIT cannot enter a callback from a C function called by JIT-compiled code; it then
-- aborts with "bad callback" instead of running it. Since the hook is reached only when the
-- device is truly out of memory, that turns an out-of-memory error in a compiled loop into an
-- abort. The hook is therefore off by default: the binding already collects by device bytes (see
-- core.lua), so little garbage is left to find; T.cuda.set_gc_on_oom(true) arms it where no code
-- is compiled (the REPL, jit.off()).

local oom_collect = ffi.cast('void (*)(void)', function() collectgarbage('collect') end)
local oom_armed = false
function T.cuda.set_gc_on_oom(on)
  oom_armed = on ~= false
  C.ts_set_oom_callback(oom_armed and oom_collect or nil)
end
function T.cuda.gc_on_oom() return oom_armed end
T.cuda.set_gc_on_oom(false)

return T
