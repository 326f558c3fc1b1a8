-- tessera.models — the model zoo (T.models): UM-MAE, MAE and SimMIM pre-training models and the
-- fine-tuning classifiers for Swin, PVT and ViT, under the official class and factory names.
--   T.models.create('mae_swin_tiny_256', {vis_mask_ratio = 0.25, norm_pix_loss = true})
--   T.models.MaskedAutoencoderSwin{img_size = 128, embed_dim = 8, ...}   (official constructor names)
local each = require 'tessera.each'
local T = require 'tessera.core'.T

local models = { layers = require 'tessera.models.layers' }
local factories = {}

for _, family in ipairs { 'swin', 'pvt', 'vit' } do
  local m = require('tessera.models.' .. family)
  models[family] = m
  for name, make in each(m.factories) do factories[name] = make end
  for name, class in each(m) do
    if type(class) == 'table' and class.__mt and name:match('^%u') and name ~= 'PatchEmbed' then models[name] = class end
  end
end
models.factories = factories

function models.names()
  local out = {}
  for name in each(factories) do out[#out + 1] = name end
  table.sort(out)
  return out
end

-- A model from a factory name and keyword arguments (official constructor names).
function models.create(name, kwargs)
  local make = factories[name]
  if not make then
    error(string.format('models.create: unknown model %s (available: %s)', tostring(name), table.concat(models.names(), ', ')), 2)
  end
  return make(kwargs)
end

T.models = models
return models
