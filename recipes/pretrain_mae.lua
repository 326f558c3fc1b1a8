-- MAE pre-training of a plain ViT with the sampling strategies of the UM-MAE paper's Table 1:
-- random (RS, MAE), grid-wise (GS), uniform (US) and uniform masking (UM = US + secondary masking).
--   tessera run recipes/pretrain_mae.lua --sampling um --data /path/to/imagenet/train
local T = require 'tessera'
local pretrain = require 'tessera.pretrain'

local SAMPLINGS = { rs = true, gs = true, us = true, um = true }

local method = {}

local function check(cfg)
  if not SAMPLINGS[cfg.sampling] then error('pretrain_mae: sampling must be rs, gs, us or um, got ' .. cfg.sampling, 0) end
end

function method.build(cfg)
  check(cfg)
  local kw = { img_size = cfg.input_size, norm_pix_loss = cfg.norm_pix_loss,
    vis_mask_ratio = cfg.sampling == 'um' and cfg.vis_mask_ratio or 0, mask_ratio = cfg.mask_ratio }
  if cfg.model == 'vit_micro' then
    kw.patch_size, kw.embed_dim, kw.depth, kw.num_heads = 8, 64, 4, 4
    kw.decoder_embed_dim, kw.decoder_depth, kw.decoder_num_heads = 64, 1, 2
    kw.norm_layer = { type = 'LayerNorm', eps = 1e-6 }
    return T.models.MaskedAutoencoderViT(kw)
  end
  if cfg.model ~= 'vit_base' then error('pretrain_mae: unknown model ' .. cfg.model .. ' (vit_base, vit_micro)', 0) end
  return T.models.create('mae_vit_base_patch16_dec512d2b', kw)
end

function method.patch(cfg) return cfg.model == 'vit_micro' and 8 or 16 end

function method.masks(cfg, n, generator)
  local side = cfg.input_size / method.patch(cfg)
  if cfg.sampling == 'rs' then
    return T.masks.random(n, side, side, { ratio = cfg.mask_ratio, generator = generator }).mask
  elseif cfg.sampling == 'gs' then
    return T.masks.grid(n, side, side, { generator = generator }).mask
  end
  return T.masks.uniform(n, side, side, { generator = generator }).mask
end

method.step = pretrain.masked_autoencoder_step

return pretrain.recipe {
  description = 'MAE pre-training of a ViT with random, grid-wise, uniform or uniform-masking sampling',
  defaults = { model = 'vit_base', sampling = 'rs', input_size = 224, mask_ratio = 0.75, vis_mask_ratio = 0.25,
    norm_pix_loss = true },
  choices = { model = { 'vit_base', 'vit_micro' }, sampling = { 'rs', 'gs', 'us', 'um' } },
  presets = { tiny = pretrain.tiny_preset { model = 'vit_micro', input_size = 64 } },
  main = function(cfg, run)
    cfg.title = 'MAE ' .. cfg.model .. ' ' .. cfg.sampling:upper()
    return pretrain.train(cfg, run, method)
  end,
}
