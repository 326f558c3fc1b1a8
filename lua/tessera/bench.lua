-- tessera.bench — what the tools/bench-* scripts share: argument parsing, a monotonic clock,
-- interleaved timing, the machine's sgemm rate measured in the same run, tables and JSON output.
-- Benchmarks report ratios measured in one run, because these machines are shared and noisy.
local T = require 'tessera'
local ffi = require 'ffi'

local B = {}

ffi.cdef [[
  typedef struct tessera_bench_timespec { long tv_sec; long tv_nsec; } tessera_bench_timespec;
  int clock_gettime(int clock_id, tessera_bench_timespec *tp);
]]

local ts = ffi.new('tessera_bench_timespec')
function B.now()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

-- Parses `--name value` / `--flag` arguments against a spec {name = default}; a default of
-- `false` marks a flag. Exits with usage on --help or an unknown argument.
function B.args(tool, argv, spec, usage)
  local out = {}
  for k, v in pairs(spec) do out[k] = v end
  local i = 1
  while i <= #argv do
    local name = argv[i]:match('^%-%-([%w_]+)$')
    if argv[i] == '--help' or argv[i] == '-h' then
      print(usage)
      os.exit(0)
    elseif not name or spec[name] == nil then
      io.stderr:write(string.format('%s: unknown argument %s\n%s\n', tool, argv[i], usage))
      os.exit(2)
    elseif spec[name] == false then
      out[name] = true
      i = i + 1
    else
      local v = argv[i + 1]
      if v == nil then
        io.stderr:write(string.format('%s: --%s needs a value\n', tool, name))
        os.exit(2)
      end
      out[name] = type(spec[name]) == 'number' and tonumber(v) or v
      if out[name] == nil then
        io.stderr:write(string.format('%s: --%s needs a number, got %s\n', tool, name, v))
        os.exit(2)
      end
      i = i + 2
    end
  end
  return out
end

-- Median seconds of `runs` calls of fn after `warmup` calls.
function B.median_time(fn, runs, warmup)
  for _ = 1, warmup or 1 do fn() end
  local times = {}
  for i = 1, runs do
    local t0 = B.now()
    fn()
    times[i] = B.now() - t0
  end
  table.sort(times)
  return times[math.floor((#times + 1) / 2)]
end

-- Seconds per call for each function, rounds interleaved so that load changes hit all of them
-- alike, the best round of each kept.
function B.interleaved(fns, rounds, round_seconds)
  local best = {}
  for _ = 1, rounds do
    for name, fn in pairs(fns) do
      local calls, t0 = 0, B.now()
      repeat
        fn()
        calls = calls + 1
      until B.now() - t0 >= round_seconds
      local per_call = (B.now() - t0) / calls
      if not best[name] or per_call < best[name] then best[name] = per_call end
    end
  end
  return best
end

-- The machine's float32 GEMM rate through tessera (which calls OpenBLAS), in GFLOP/s.
function B.sgemm_gflops(n, rounds)
  n = n or 1024
  local a, b = T.randn(n, n), T.randn(n, n)
  local t = B.interleaved({ sgemm = function() a:matmul(b) end }, rounds or 3, 0.5).sgemm
  return 2 * n ^ 3 / t / 1e9
end

-- Peak resident set size of this process in MB (VmHWM).
function B.peak_rss_mb()
  local f = io.open('/proc/self/status')
  if not f then return nil end
  local text = f:read('*a')
  f:close()
  local kb = text:match('VmHWM:%s*(%d+)')
  return kb and tonumber(kb) / 1024 or nil
end

-- Prints rows (lists of cells) as an aligned table under a header.
function B.table(header, rows)
  local widths = {}
  for _, row in ipairs({ header, unpack(rows) }) do
    for c, cell in ipairs(row) do widths[c] = math.max(widths[c] or 0, #tostring(cell)) end
  end
  local function line(row)
    local cells = {}
    for c, cell in ipairs(row) do
      local s = tostring(cell)
      cells[c] = c == 1 and s .. string.rep(' ', widths[c] - #s) or string.rep(' ', widths[c] - #s) .. s
    end
    return table.concat(cells, '  ')
  end
  print(line(header))
  for _, row in ipairs(rows) do print(line(row)) end
end

-- Writes the figures as one JSON object (when a path is given).
function B.write_json(path, figures)
  if not path then return end
  local f = assert(io.open(path, 'w'))
  f:write(T.json.encode(figures, { indent = 2 }), '\n')
  f:close()
end

return B
