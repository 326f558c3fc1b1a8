-- SimMIM pre-training of Swin or PVT: mask tokens in the full-size encoder, L1 loss on the raw
-- pixels of the masked patches (the UM-MAE paper's SimMIM baseline, which masks 75% of the 16-pixel
-- patches by random sampling; --sampling simmim --mask_ratio 0.6 uses SimMIM's own 32-pixel blocks).
--   tessera run recipes/pretrain_simmim.lua --model swin_tiny --data /path/to/imagenet/train
local T = require 'tessera'
local pretrain = require 'tessera.pretrain'
local L = require 'tessera.models.layers'

local MODELS = { swin_tiny = 'simmim_swin_tiny_256', pvt_small = 'simmim_pvt_small_256' }

local method = {}

function method.build(cfg)
  if cfg.model == 'swin_micro' then
    return T.models.SimMIMSwin{ img_size = cfg.input_size, patch_size = 2, stride = 8, embed_dim = 32,
      depths = { 2, 2, 2, 2 }, num_heads = { 1, 2, 4, 8 }, window_size = 4, posmlp_dim = 16, mlp_ratio = 4,
      norm_layer = { type = 'LayerNorm', eps = 1e-6 }, norm_pix_loss = cfg.norm_pix_loss }
  end
  local name = MODELS[cfg.model]
  if not name then error('pretrain_simmim: unknown model ' .. cfg.model .. ' (swin_tiny, pvt_small, swin_micro)', 0) end
  return T.models.create(name, { img_size = cfg.input_size, norm_pix_loss = cfg.norm_pix_loss })
end

function method.patch(cfg) return cfg.model == 'swin_micro' and 8 or 16 end

-- 'rs' (default): random sampling of mask_ratio of the patches, the masks UM-MAE's SimMIM baseline
-- trains with; 'simmim': SimMIM's own generator, random blocks of mask_patch_size pixels
function method.masks(cfg, n, generator)
  local side = cfg.input_size / method.patch(cfg)
  if cfg.sampling == 'rs' then
    return T.masks.random(n, side, side, { ratio = cfg.mask_ratio, generator = generator }).mask
  end
  return T.masks.simmim(n, { input_size = cfg.input_size, mask_patch_size = cfg.mask_patch_size,
    model_patch_size = method.patch(cfg), ratio = cfg.mask_ratio, generator = generator }).mask
end

function method.step(model, imgs, mask)
  local loss, pred, extra = model(imgs, mask)
  return loss, L.take_rows(pred, extra.removed)
end

return pretrain.recipe {
  description = 'SimMIM pre-training (mask tokens in the full encoder, L1 loss) of Swin or PVT',
  defaults = { model = 'swin_tiny', input_size = 256, sampling = 'rs', mask_ratio = 0.75, mask_patch_size = 32,
    norm_pix_loss = false },
  choices = { model = { 'swin_tiny', 'pvt_small', 'swin_micro' }, sampling = { 'rs', 'simmim' } },
  presets = { tiny = pretrain.tiny_preset { model = 'swin_micro', input_size = 64, mask_patch_size = 16 } },
  main = function(cfg, run)
    cfg.title = 'SimMIM ' .. cfg.model
    return pretrain.train(cfg, run, method)
  end,
}
