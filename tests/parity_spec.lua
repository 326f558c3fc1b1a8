-- parity_spec.lua — tessera against the official UM-MAE PyTorch code: every reference file in
-- ../shared/ref/ must pass `tessera parity` (loss rel 1e-5, every gradient rel 1e-3 with an
-- absolute floor of 1e-6 for near-zero references); files of the same format with other sizes
-- must work too, and a wrong gradient must be caught.
local each = require 'tessera.each'
local T = require 'tessera'
local P = require 'tessera.parity'
local S = require 'support'

local REF = S.REF
local ref_files = S.ref_files()

describe('parity with the official implementation', function()
  if #ref_files == 0 then
    pending('no reference files in ' .. REF)
    return
  end
  for _, path in ipairs(ref_files) do
    it(path:match('[^/]+$'), function()
      local report = P.check(path)
      assert(report.ok, P.format(report))
      assert.is_true(report.loss.rel <= P.LOSS_RTOL)
      assert.is_true(#report.grads > 40)
    end)
  end
end)

-- Writes a file in the reference format from our own forward/backward.
local function export(path, class, kwargs, inputs)
  T.manual_seed(7)
  local model = T.models[class](kwargs)
  model:train()
  local loss, out
  if class == 'Swin' or class == 'PVT' then
    out = model(inputs.imgs)
    loss = T.F.cross_entropy(out, inputs.labels)
  else
    loss, out = model(inputs.imgs, inputs.mask, { noise = inputs.noise })
  end
  loss:backward()
  local tensors = {}
  for name, t in each(model:state_dict()) do tensors[name] = t end
  for name, p in model:named_parameters() do
    if p.grad then tensors['grad.' .. name] = p.grad end
  end
  for name, t in each(inputs) do tensors['input.' .. name] = t end
  tensors['output.loss'] = loss:detach():reshape(1)
  tensors[(class == 'Swin' or class == 'PVT') and 'output.logits' or 'output.pred'] = out:detach()
  T.save(path, tensors, { metadata = { model_class = class, ctor_kwargs = T.json.encode(kwargs), format = 'ummae-ref/1' } })
end

describe('the parity tool', function()
  local dir = os.tmpname()
  os.remove(dir)
  os.execute('mkdir -p ' .. dir)

  it('reads any file of the format, with other sizes than the reference ones', function()
    T.manual_seed(3)
    local imgs = T.randn(3, 3, 64, 64)
    local mask = T.masks.uniform(3, 4, 4).mask
    local path = dir .. '/swin64.safetensors'
    export(path, 'MaskedAutoencoderSwin', { img_size = 64, patch_size = 4, stride = 16, embed_dim = 8,
      depths = { 1, 1, 2, 1 }, num_heads = { 1, 2, 2, 4 }, window_size = 2, posmlp_dim = 8, decoder_embed_dim = 16,
      decoder_depth = 1, decoder_num_heads = 2, norm_layer = { type = 'LayerNorm', eps = 1e-6 },
      norm_pix_loss = true, vis_mask_ratio = 0.25 }, { imgs = imgs, mask = mask, noise = T.rand(3, 16) })
    local report = P.check(path)
    assert(report.ok, P.format(report))
    assert.equal(0, report.loss.rel)
  end)

  it('fails, naming the tensor, when a gradient is off', function()
    local path = dir .. '/pvt_cls.safetensors'
    T.manual_seed(4)
    export(path, 'PVT', { img_size = 32, num_classes = 5, patch_size = 4, embed_dims = { 8, 16 }, depths = { 1, 1 },
      num_heads = { 1, 2 }, mlp_ratios = { 2, 2 }, sr_ratios = { 2, 1 }, drop_path_rate = 0 },
      { imgs = T.randn(2, 3, 32, 32), labels = T.tensor({ 1, 4 }, { dtype = 'int64' }) })
    local tensors, meta = T.load(path)
    local copy = {}
    for k, v in each(tensors) do copy[k] = v:clone() end
    copy['grad.head.weight'] = copy['grad.head.weight'] * 1.01
    T.save(path, copy, { metadata = meta })
    local report = P.check(path)
    assert.is_false(report.ok)
    local text = P.format(report, true)
    assert.truthy(text:find('head.weight', 1, true))
    assert.truthy(text:find('FAIL', 1, true))
  end)

  it('explains files it cannot use', function()
    local path = dir .. '/plain.safetensors'
    T.save(path, { x = T.zeros(2) })
    local ok, err = pcall(P.check, path)
    assert.is_false(ok)
    assert.truthy(tostring(err):find('model_class', 1, true))
  end)
end)
