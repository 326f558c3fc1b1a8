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
-- Caps the bytes live tensors may hold on a device (nil or 0: no cap): past it allocations fail as if
-- the device were full (after the collection-and-retry every tensor-making call gets).
function T.set_memory_limit(bytes, device)
  core.check(C.ts_memory_set_limit(core.device(device, 'set_memory_limit'), bytes or 0))
end
-- Gives the allocator's cached blocks back to the system.
function T.empty_cache(device) core.check(C.ts_memory_empty_cache(core.device(device, 'empty_cache'))) end

T.cuda = {}
function T.cuda.is_compiled() return C.ts_cuda_compiled() ~= 0 end
function T.cuda.device_count() return C.ts_cuda_device_count() end
function T.cuda.is_available() return C.ts_cuda_device_count() > 0 end
function T.cuda.synchronize(index) core.check(C.ts_cuda_synchronize(index or 0)) end
function T.cuda.memory_stats(index) return T.memory_stats('cuda:' .. (index or 0)) end
function T.cuda.empty_cache(index) T.empty_cache('cuda:' .. (index or 0)) end

return T
