-- UM-MAE pre-training (Uniform Masking: uniform sampling + secondary masking) of a pyramid ViT.
--   tessera run recipes/pretrain_ummae.lua --model swin_tiny --data /path/to/imagenet/train
--   tessera run recipes/pretrain_ummae.lua --preset tiny --output_dir out   (a small Swin on Fashion-MNIST)
--   ... --device cuda --precision bf16   (forward and loss under bfloat16 autocast; a no-op on the CPU;
--                                         fp16: float16 autocast with a loss scaler, as the official AMP)
-- Defaults follow the paper's Table 8: AdamW (0.9, 0.95), base lr 1.5e-4 x batch / 256, weight
-- decay 0.05, cosine schedule with 10 warm-up epochs of 200, normalized-pixel loss, secondary
-- masking ratio 0.25, 256 x 256 inputs.
local T = require 'tessera'
local pretrain = require 'tessera.pretrain'

local MODELS = {
  swin_tiny = 'mae_swin_tiny_256', swin_large = 'mae_swin_large_256', pvt_small = 'mae_pvt_small_256',
  vit_base = 'mae_vit_base_patch16_dec512d2b',
}

-- A Swin small enough for a laptop CPU: 2-pixel tokens, 8-pixel patches, four stages of width 32-256.
local function swin_micro(cfg)
  return T.models.MaskedAutoencoderSwin{ img_size = cfg.input_size, patch_size = 2, stride = 8, embed_dim = 32,
    depths = { 2, 2, 2, 2 }, num_heads = { 1, 2, 4, 8 }, window_size = 4, posmlp_dim = 16, mlp_ratio = 4,
    decoder_embed_dim = 64, decoder_depth = 1, decoder_num_heads = 2, norm_layer = { type = 'LayerNorm', eps = 1e-6 },
    norm_pix_loss = cfg.norm_pix_loss, vis_mask_ratio = cfg.vis_mask_ratio, decoder_pos = cfg.decoder_pos }
end

local method = {}

function method.build(cfg)
  if cfg.model == 'swin_micro' then return swin_micro(cfg) end
  local name = MODELS[cfg.model]
  if not name then error('pretrain_ummae: unknown model ' .. cfg.model .. ' (swin_tiny, swin_large, pvt_small, vit_base, swin_micro)', 0) end
  local kw = { img_size = cfg.input_size, norm_pix_loss = cfg.norm_pix_loss, vis_mask_ratio = cfg.vis_mask_ratio }
  if cfg.model ~= 'vit_base' then kw.decoder_pos = cfg.decoder_pos end
  return T.models.create(name, kw)
end

function method.patch(cfg)
  if cfg.model == 'swin_micro' then return 8 end
  return 16
end

function method.masks(cfg, n, generator)
  local side = cfg.input_size / method.patch(cfg)
  return T.masks.uniform(n, side, side, { generator = generator }).mask
end

method.step = pretrain.masked_autoencoder_step

return pretrain.recipe {
  description = 'UM-MAE pre-training (uniform sampling + secondary masking) of Swin, PVT or ViT',
  defaults = { model = 'swin_tiny', input_size = 256, vis_mask_ratio = 0.25, norm_pix_loss = true,
    decoder_pos = 'official' },
  choices = { model = { 'swin_tiny', 'swin_large', 'pvt_small', 'vit_base', 'swin_micro' },
    decoder_pos = { 'official', 'corrected' } },
  presets = {
    -- the README's main job: a small Swin on Fashion-MNIST
    tiny = pretrain.tiny_preset { model = 'swin_micro', input_size = 64 },
    -- the official Swin-L run: 800 epochs, 40 of warm-up, 64 per GPU x 8 accumulation x 8 GPUs
    paper_swin_large = { model = 'swin_large', batch_size = 64, accum_iter = 64, epochs = 800, warmup_epochs = 40 },
  },
  main = function(cfg, run)
    cfg.title = 'UM-MAE ' .. cfg.model
    return pretrain.train(cfg, run, method)
  end,
}
