-- tessera.models.vit — plain ViT: MAE pre-training (MaskedAutoencoderViT, with random sampling or
-- UM-MAE's uniform masking + secondary masking) and the fine-tuning classifier
-- (VisionTransformer with global pooling), after the official models_mae.py and models_vit.py.
local T = require 'tessera.core'.T
local nn = T.nn
local L = require 'tessera.models.layers'

local M = {}

local PatchEmbed = nn.Module:extend('PatchEmbed')
function PatchEmbed:__init(patch_size, in_chans, embed_dim)
  self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, { stride = patch_size })
end
function PatchEmbed:forward(x) return self.proj(x):flatten(2):transpose(1, 2) end

local function build_blocks(depth, dim, heads, mlp_ratio, eps, drop_path_rate)
  local rates = L.drop_path_rates(drop_path_rate or 0, depth)
  local blocks = nn.ModuleList{}
  for i = 1, depth do blocks:append(L.Block(dim, heads, mlp_ratio, { eps = eps, drop_path = rates[i] })) end
  return blocks
end

-- ---- MAE -------------------------------------------------------------------------------------------
local MaskedAutoencoderViT = nn.Module:extend('MaskedAutoencoderViT')
M.MaskedAutoencoderViT = MaskedAutoencoderViT

local mae_defaults = {
  img_size = 224, patch_size = 16, in_chans = 3, embed_dim = 1024, depth = 24, num_heads = 16,
  decoder_embed_dim = 512, decoder_depth = 8, decoder_num_heads = 16, mlp_ratio = 4,
  norm_layer = { type = 'LayerNorm', eps = 1e-5 }, norm_pix_loss = false, asymmetric_decoder = false,
  mask_ratio = 0.75, vis_mask_ratio = 0,
}

function MaskedAutoencoderViT:__init(kwargs)
  local a = L.args('MaskedAutoencoderViT', kwargs, mae_defaults)
  self.config = a
  local eps = L.norm_eps(a.norm_layer)
  self.grid = a.img_size / a.patch_size
  local patches = self.grid * self.grid
  if a.vis_mask_ratio > 0 then self.vis_mask_token = nn.Parameter(T.zeros(1, 1, a.embed_dim)) end
  self.patch_embed = PatchEmbed(a.patch_size, a.in_chans, a.embed_dim)
  self.cls_token = nn.Parameter(T.zeros(1, 1, a.embed_dim))
  self.pos_embed = nn.Parameter(T.zeros(1, patches + 1, a.embed_dim), false)
  self.blocks = build_blocks(a.depth, a.embed_dim, a.num_heads, a.mlp_ratio, eps)
  self.norm = nn.LayerNorm(a.embed_dim, { eps = eps })
  self.decoder_embed = nn.Linear(a.embed_dim, a.decoder_embed_dim)
  self.mask_token = nn.Parameter(T.zeros(1, 1, a.decoder_embed_dim))
  self.decoder_pos_embed = nn.Parameter(T.zeros(1, patches + 1, a.decoder_embed_dim), false)
  self.decoder_blocks = build_blocks(a.decoder_depth, a.decoder_embed_dim, a.decoder_num_heads, a.mlp_ratio, eps)
  self.decoder_norm = nn.LayerNorm(a.decoder_embed_dim, { eps = eps })
  self.decoder_pred = nn.Linear(a.decoder_embed_dim, a.patch_size * a.patch_size * a.in_chans)
  self:initialize_weights()
end

-- As the official initialize_weights; the patch-embedding bias keeps PyTorch's default conv init.
function MaskedAutoencoderViT:initialize_weights()
  local a = self.config
  T.no_grad(function()
    self.pos_embed:copy_(L.sincos_pos_embed(a.embed_dim, self.grid, true))
    self.decoder_pos_embed:copy_(L.sincos_pos_embed(a.decoder_embed_dim, self.grid, true))
  end)
  L.init_patch_embed(self.patch_embed.proj)
  nn.init.normal_(self.cls_token, 0, 0.02)
  nn.init.normal_(self.mask_token, 0, 0.02)
  if self.vis_mask_token then nn.init.normal_(self.vis_mask_token, 0, 0.02) end
  L.init_weights(self, false)
end

-- The secondary mask over the V visible tokens (raster order), [N, V] with 1 = replaced: given in
-- opts.vis_mask, made from opts.noise ([N, V]) with the official formula, or drawn.
function MaskedAutoencoderViT:secondary_mask(mask, opts)
  if opts.vis_mask then return opts.vis_mask end
  return T.masks.secondary(mask, { ratio = self.config.vis_mask_ratio, noise = opts.noise, formula = 'vit',
    generator = opts.generator }).vis_mask
end

function MaskedAutoencoderViT:forward_encoder(imgs, mask, opts)
  local x = self.patch_embed(imgs)
  local N, D = x:size(0), x:size(2)
  local pos = self.pos_embed:narrow(1, 1, self.grid * self.grid)
  x = x + pos
  local order, V = L.visible_first(mask)
  local visible = order:narrow(1, 0, V)
  x = L.take_rows(x, visible)
  if self.vis_mask_token then
    local w = self:secondary_mask(mask, opts):to{ dtype = x.dtype, device = x.device }:unsqueeze(-1)
    local tokens = L.take_rows((self.vis_mask_token + pos):expand(N, self.grid * self.grid, D), visible)
    x = x * (1 - w) + tokens * w
  end
  local cls = (self.cls_token + self.pos_embed:narrow(1, 0, 1)):expand(N, 1, D)
  x = T.cat({ cls, x }, 1)
  for _, blk in self.blocks:iter() do x = blk(x) end
  return self.norm(x), order, V
end

-- Visible tokens keep their raster order here, so there is no position quirk in the ViT.
function MaskedAutoencoderViT:forward_decoder(latent, order, V)
  local x = self.decoder_embed(latent)
  local N, D = x:size(0), x:size(2)
  local Lp = self.grid * self.grid
  local pos = L.take_rows(self.decoder_pos_embed:narrow(1, 1, Lp):expand(N, Lp, D), order)
  local body = T.cat({ x:narrow(1, 1, V) + pos:narrow(1, 0, V), self.mask_token + pos:narrow(1, V, Lp - V) }, 1)
  x = T.cat({ x:narrow(1, 0, 1) + self.decoder_pos_embed:narrow(1, 0, 1), body }, 1)
  for _, blk in self.decoder_blocks:iter() do x = blk(x) end
  x = self.decoder_pred(self.decoder_norm(x))
  return x:narrow(1, 1, Lp), Lp - V
end

function MaskedAutoencoderViT:forward(imgs, mask, opts)
  opts = opts or {}
  local latent, order, V = self:forward_encoder(imgs, mask, opts)
  local pred, removed = self:forward_decoder(latent, order, V)
  local target = L.take_rows(L.patchify(imgs, self.config.patch_size), order:narrow(1, V, removed))
  if self.config.norm_pix_loss then target = L.normalize_patches(target) end
  local loss = T.F.mse_loss(pred:narrow(1, V, removed), target)
  return loss, pred, { latent = latent }
end

-- ---- the classifier ----------------------------------------------------------------------------------
local VisionTransformer = nn.Module:extend('VisionTransformer')
M.VisionTransformer = VisionTransformer

local cls_defaults = {
  img_size = 224, patch_size = 16, in_chans = 3, num_classes = 1000, embed_dim = 768, depth = 12, num_heads = 12,
  mlp_ratio = 4, qkv_bias = true, drop_path_rate = 0, norm_layer = { type = 'LayerNorm', eps = 1e-6 }, global_pool = true,
}

function VisionTransformer:__init(kwargs)
  local a = L.args('VisionTransformer', kwargs, cls_defaults)
  self.config = a
  local eps = L.norm_eps(a.norm_layer)
  self.grid = a.img_size / a.patch_size
  self.cls_token = nn.Parameter(T.zeros(1, 1, a.embed_dim))
  self.pos_embed = nn.Parameter(T.zeros(1, self.grid * self.grid + 1, a.embed_dim))
  self.patch_embed = PatchEmbed(a.patch_size, a.in_chans, a.embed_dim)
  self.blocks = build_blocks(a.depth, a.embed_dim, a.num_heads, a.mlp_ratio, eps, a.drop_path_rate)
  if not a.global_pool then self.norm = nn.LayerNorm(a.embed_dim, { eps = eps }) end
  self.head = a.num_classes > 0 and nn.Linear(a.embed_dim, a.num_classes) or nn.Identity()
  if a.global_pool then self.fc_norm = nn.LayerNorm(a.embed_dim, { eps = eps }) end
  -- timm's initialization: truncated normal (std 0.02) for linear weights and the tokens
  nn.init.trunc_normal_(self.pos_embed, 0, 0.02)
  nn.init.trunc_normal_(self.cls_token, 0, 0.02)
  self:apply(function(m)
    if m.__name == 'Linear' then
      nn.init.trunc_normal_(m.weight, 0, 0.02)
      if m.bias then nn.init.zeros_(m.bias) end
    end
  end)
end

function VisionTransformer:forward(imgs)
  local x = self.patch_embed(imgs)
  local N, D = x:size(0), x:size(2)
  x = T.cat({ self.cls_token:expand(N, 1, D), x }, 1) + self.pos_embed
  for _, blk in self.blocks:iter() do x = blk(x) end
  if self.config.global_pool then
    x = self.fc_norm(x:narrow(1, 1, x:size(1) - 1):mean(1))
  else
    x = self.norm(x):select(1, 0)
  end
  return self.head(x)
end

function VisionTransformer:no_weight_decay() return { pos_embed = true, cls_token = true } end

-- ---- factories ---------------------------------------------------------------------------------------
local with = L.merge

local base = { patch_size = 16, embed_dim = 768, depth = 12, num_heads = 12, mlp_ratio = 4,
  norm_layer = { type = 'LayerNorm', eps = 1e-6 } }

-- decoder 512-d with 8 blocks (MAE's recommended mae_vit_base_patch16) or 2 (the light decoder that
-- UM-MAE's ViT-B runs, MAE-RS and UM alike, use)
local function mae_vit_base(decoder_depth)
  return function(kw)
    return MaskedAutoencoderViT(with(base, with({ decoder_embed_dim = 512, decoder_depth = decoder_depth,
      decoder_num_heads = 16 }, kw)))
  end
end

M.factories = {
  mae_vit_base_patch16 = mae_vit_base(8),
  mae_vit_base_patch16_dec512d8b = mae_vit_base(8),
  mae_vit_base_patch16_dec512d2b = mae_vit_base(2),
  vit_base_patch16 = function(kw) return VisionTransformer(with(base, kw)) end,
}

return M
