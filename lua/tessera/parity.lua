-- tessera.parity — checks tessera against a reference file from the official UM-MAE code:
-- builds the model named in the file's metadata with its constructor arguments, loads the
-- weights by name, runs forward and backward on the saved inputs and compares the loss and every
-- parameter gradient (see ../shared/ref/README.md for the format and the tolerances).
--   local report = require('tessera.parity').check('ref/ummae_swin_tiny.safetensors')
--   tessera parity FILE.safetensors [--device cuda] [--quiet]
local each = require 'tessera.each'
local T = require 'tessera'
require 'tessera.models'

local P = {}

P.LOSS_RTOL = 1e-5     -- |loss - ref| / |ref|
P.GRAD_RTOL = 1e-3     -- ||g - g_ref|| / ||g_ref||, per tensor
P.GRAD_FLOOR = 1e-6    -- below this reference norm, compare ||g - g_ref|| <= GRAD_FLOOR instead
P.OUTPUT_RTOL = 1e-4   -- relative L2 error of output.pred / output.logits

local function l2(t) return t:double():norm():item() end

local function rel_err(a, ref)
  local diff = l2(a:double() - ref:double())
  local n = l2(ref)
  return n > 0 and diff / n or diff, n
end

local function split_file(tensors)
  local sd, inputs, grads, outputs = {}, {}, {}, {}
  for name, t in each(tensors) do
    local kind, rest = name:match('^(%a+)%.(.+)$')
    if kind == 'input' then inputs[rest] = t
    elseif kind == 'grad' then grads[rest] = t
    elseif kind == 'output' then outputs[rest] = t
    elseif kind ~= 'act' and kind ~= 'extra' then sd[name] = t end
  end
  return sd, inputs, grads, outputs
end

local function decode_meta(meta, key, path)
  local text = meta[key]
  if text == nil then error(string.format('parity: %s has no metadata key %s', path, key), 0) end
  local ok, value = pcall(T.json.decode, text)
  if not ok then error(string.format('parity: %s: metadata %s is not valid JSON (%s)', path, key, value), 0) end
  return value
end

-- Runs the model on the file's inputs: returns loss, the main output and the masks it made.
-- Images and labels go to the device; masks and mask noise stay on the host, where the recipes make masks.
local function run_model(model, class, inputs, device)
  local function dev(t) return t and t:to(device) or nil end
  local imgs = dev(inputs.imgs)
  if class == 'Swin' or class == 'PVT' then
    local logits = model(imgs)
    return T.F.cross_entropy(logits, dev(inputs.labels)), logits, {}
  end
  local mask = inputs.mask
  if class == 'SimMIMSwin' or class == 'SimMIMPVT' then
    local loss, pred = model(imgs, mask)
    return loss, pred, {}
  end
  local loss, pred, extra = model(imgs, mask, { noise = inputs.noise })
  local made = { new_mask = extra.new_mask }
  if class == 'MaskedAutoencoderViT' and model.vis_mask_token then
    made.vis_mask = model:secondary_mask(mask, { noise = inputs.noise })
  end
  return loss, pred, made
end

local function same_mask(a, b)
  return a:to('int64'):cpu():eq(b:to('int64')):all():item()
end

-- Returns a report: {ok, loss = {value, ref, rel}, output_rel, masks = {...}, grads = {{name, ref_norm, err, ok}}}.
function P.check(path, opts)
  opts = opts or {}
  local device = opts.device or 'cpu'
  local tensors, meta = T.load(path)
  local class = meta.model_class
  if not class then error('parity: ' .. path .. ' has no model_class in its metadata', 0) end
  local ctor = T.models[class]
  if not ctor then error(string.format('parity: %s: unknown model class %s', path, class), 0) end
  local kwargs = decode_meta(meta, 'ctor_kwargs', path)
  local sd, inputs, grads, outputs = split_file(tensors)

  T.manual_seed(0)
  local model = ctor(kwargs)
  model:load_state_dict(sd)
  model:to(device):train()
  model:zero_grad()
  local loss, out, made = run_model(model, class, inputs, device)
  loss:backward()

  local report = { path = path, class = class, ok = true, grads = {}, masks = {} }
  local ref_loss = outputs.loss:item()
  local value = loss:item()
  report.loss = { value = value, ref = ref_loss, rel = math.abs(value - ref_loss) / math.abs(ref_loss) }
  if report.loss.rel > P.LOSS_RTOL or value ~= value then report.ok = false end
  local ref_out = outputs.pred or outputs.logits
  if ref_out then
    report.output_rel = rel_err(out:detach():cpu(), ref_out)
    if report.output_rel > P.OUTPUT_RTOL then report.ok = false end
  end
  for _, key in ipairs { 'new_mask', 'vis_mask' } do
    if made[key] and inputs[key] then
      local equal = same_mask(made[key], inputs[key])
      report.masks[#report.masks + 1] = { name = key, ok = equal }
      if not equal then report.ok = false end
    end
  end
  local params = {}
  for name, p in model:named_parameters() do params[name] = p end
  local names = {}
  for name in each(grads) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    local p = params[name]
    local row = { name = name }
    if not p then
      row.err, row.ok, row.note = math.huge, false, 'no such parameter'
    elseif not p.grad then
      row.err, row.ok, row.note = math.huge, false, 'no gradient'
    else
      local g = p.grad:cpu()
      local ref_norm = l2(grads[name])
      row.ref_norm = ref_norm
      if ref_norm < P.GRAD_FLOOR then
        row.err, row.absolute = l2(g:double() - grads[name]:double()), true
        row.ok = row.err <= P.GRAD_FLOOR
      else
        row.err = rel_err(g, grads[name])
        row.ok = row.err <= P.GRAD_RTOL
      end
    end
    if not row.ok then report.ok = false end
    report.grads[#report.grads + 1] = row
  end
  return report
end

-- The report as a table: every gradient with its error (or only the worst ones with quiet).
function P.format(report, quiet)
  local lines = {}
  local function add(...) lines[#lines + 1] = string.format(...) end
  add('%s  (%s)', report.path, report.class)
  add('  loss        %.10g  reference %.10g  rel err %.2e  %s', report.loss.value, report.loss.ref, report.loss.rel,
    report.loss.rel <= P.LOSS_RTOL and 'ok' or 'FAIL')
  if report.output_rel then
    add('  output      rel L2 err %.2e  %s', report.output_rel, report.output_rel <= P.OUTPUT_RTOL and 'ok' or 'FAIL')
  end
  for _, m in ipairs(report.masks) do add('  %-11s %s', m.name, m.ok and 'identical' or 'DIFFERENT  FAIL') end
  local rows = {}
  for _, r in ipairs(report.grads) do rows[#rows + 1] = r end
  table.sort(rows, function(a, b) return a.err > b.err end)
  local width = 8
  for _, r in ipairs(rows) do width = math.max(width, #r.name) end
  add('  %-' .. width .. 's  %10s  %10s  %s', 'gradient', '|g_ref|', 'error', '')
  local worst_ok = 0
  for i, r in ipairs(rows) do
    if not quiet or not r.ok or i <= 5 then
      add('  %-' .. width .. 's  %10.3e  %10.3e  %s%s', r.name, r.ref_norm or 0, r.err, r.absolute and '(abs) ' or '',
        r.ok and 'ok' or ('FAIL' .. (r.note and (' ' .. r.note) or '')))
    end
    if r.ok then worst_ok = math.max(worst_ok, r.err) end
  end
  if quiet and #rows > 5 then add('  ... %d gradients, all within tolerance unless listed', #rows) end
  add('  %s: %d gradients checked (relative tolerance %.0e, absolute floor %.0e)', report.ok and 'PASS' or 'FAIL',
    #rows, P.GRAD_RTOL, P.GRAD_FLOOR)
  return table.concat(lines, '\n')
end

-- tessera parity FILE... [--device D] [--quiet]: exit status 0 when every file passes.
function P.main(args)
  local files, opts = {}, {}
  local i = 1
  while i <= #args do
    local a = args[i]
    if a == '--device' then opts.device = args[i + 1]; i = i + 1
    elseif a == '--quiet' then opts.quiet = true
    elseif a:sub(1, 2) == '--' then error('parity: unknown option ' .. a .. ' (valid: --device, --quiet)', 0)
    else files[#files + 1] = a end
    i = i + 1
  end
  if #files == 0 then error('usage: tessera parity FILE.safetensors... [--device cuda] [--quiet]', 0) end
  local all_ok = true
  for _, path in ipairs(files) do
    local report = P.check(path, opts)
    print(P.format(report, opts.quiet))
    all_ok = all_ok and report.ok
  end
  return all_ok
end

return P
