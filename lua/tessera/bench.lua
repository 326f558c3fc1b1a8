-- tessera.bench — what the tools/bench-* scripts share: argument parsing, a monotonic clock,
-- interleaved timing, the machine's sgemm rate measured in the same run, tables and JSON output.
-- Benchmarks report ratios measured in one run, because these machines are shared and noisy.
local each = require 'tessera.each'
local T = require 'tessera'
local core = require 'tessera.core'

local B = {}

B.now = core.now

-- Parses `--name value` / `--flag` arguments against a spec {name = default}; a default of
-- `false` marks a flag. Exits with usage on --help or an unknown argument.
function B.args(tool, argv, spec, usage)
  local out = core.merge(spec)
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
    for name, fn in each(fns) do
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

-- ---- pre-training steps (tools/bench-pretrain on the CPU, tools/bench-gpu) -------------------------
-- The models of the UM-MAE paper's efficiency comparison at 256², each with its masks:
--   ummae_*   the UM-MAE encoders {vis_mask_ratio = 0.25, norm_pix_loss = true}, uniform masks
--   simmim_*  SimMIM, 75% of the 16-pixel patches by random sampling (the paper's baseline)
-- UM-MAE Swin-T does 20.4 GFLOP per image per step (forward and backward).
B.PRETRAIN_IMAGE = 256
B.PRETRAIN_GFLOP_PER_IMAGE = 20.4

local function ummae_mask(n) return T.masks.uniform(n, B.PRETRAIN_IMAGE / 16, B.PRETRAIN_IMAGE / 16).mask end
local function simmim_mask(n) return T.masks.random(n, B.PRETRAIN_IMAGE / 16, B.PRETRAIN_IMAGE / 16).mask end
local UMMAE_OPTS = { vis_mask_ratio = 0.25, norm_pix_loss = true }

B.PRETRAIN_MODELS = {
  { key = 'ummae_swin_tiny', label = 'UM-MAE Swin-T', factory = 'mae_swin_tiny_256', kwargs = UMMAE_OPTS,
    mask = ummae_mask },
  { key = 'ummae_pvt_small', label = 'UM-MAE PVT-S', factory = 'mae_pvt_small_256', kwargs = UMMAE_OPTS,
    mask = ummae_mask },
  { key = 'simmim_swin_tiny', label = 'SimMIM Swin-T', factory = 'simmim_swin_tiny_256', mask = simmim_mask },
  { key = 'simmim_pvt_small', label = 'SimMIM PVT-S', factory = 'simmim_pvt_small_256', mask = simmim_mask },
}
-- The UM-MAE / SimMIM pairs: { key suffix, label }.
B.PRETRAIN_PAIRS = { { 'swin_tiny', 'Swin-T' }, { 'pvt_small', 'PVT-S' } }

-- The models whose keys are in the comma-separated `only` (all of them when nil).
function B.pretrain_models(only)
  local out = {}
  for _, cfg in ipairs(B.PRETRAIN_MODELS) do
    local wanted = only == nil
    for name in (only or ''):gmatch('[^,]+') do wanted = wanted or name == cfg.key end
    if wanted then out[#out + 1] = cfg end
  end
  return out
end

function B.median(xs)
  local s = { unpack(xs) }
  table.sort(s)
  local n = #s
  return n % 2 == 1 and s[(n + 1) / 2] or (s[n / 2] + s[n / 2 + 1]) / 2
end

-- MAE's optimizer: AdamW(param_groups_weight_decay(model, 0.05), lr = blr * B / 256, betas (0.9, 0.95)).
function B.mae_optimizer(model, batch)
  local groups = T.optim.param_groups_weight_decay(model, 0.05)
  return T.optim.AdamW(groups, { lr = 1.5e-4 * batch / 256, betas = { 0.9, 0.95 } })
end

-- One model's training step at `batch` on `device` (default 'cpu'): returns step(), which runs the
-- forward (under T.autocast(precision) when precision is 'bfloat16' or 'float16'), the backward and
-- the AdamW update and returns the loss, and release(), which drops the model and its state.
function B.pretrain_step(cfg, batch, device, precision)
  device = device or 'cpu'
  T.manual_seed(0)
  local model = T.models.create(cfg.factory, cfg.kwargs):to(device) -- before the optimizer takes its parameters
  model:train()
  local opt = B.mae_optimizer(model, batch)
  local imgs = T.randn(batch, 3, B.PRETRAIN_IMAGE, B.PRETRAIN_IMAGE, { device = device })
  local mask = cfg.mask(batch) -- masks are made on the host, as in training
  local function forward() return (model(imgs, mask)) end
  local mixed = precision ~= nil and precision ~= 'float32'
  local function step()
    opt:zero_grad()
    local loss
    if mixed then loss = T.autocast(precision, forward) else loss = forward() end
    loss:backward()
    opt:step()
    local value = loss:item()
    loss:free()
    return value
  end
  local function release()
    model, opt, imgs, mask = nil, nil, nil, nil
    collectgarbage('collect')
  end
  return step, release
end

-- Writes the figures as one JSON object (when a path is given).
function B.write_json(path, figures)
  if not path then return end
  local f = assert(io.open(path, 'w'))
  f:write(T.json.encode(figures, { indent = 2 }), '\n')
  f:close()
end

return B
