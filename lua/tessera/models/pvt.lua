-- tessera.models.pvt — PVT v1 (spatial-reduction attention): the UM-MAE pre-training model
-- (MaskedAutoencoderPVT), SimMIM (SimMIMPVT) and the classifier (PVT), after the official
-- models_mae_pvt.py, models_simmim_pvt.py and models_pvt.py (github implus/UM-MAE).
local T = require 'tessera.core'.T
local nn = T.nn
local L = require 'tessera.models.layers'
local umd = require 'tessera.models.um_decoder'

local M = {}

-- Keys and values come from the tokens average-pooled by sr_ratio, a 1x1 conv and a LayerNorm
-- (all applied even at sr_ratio 1, as the official code does).
local Attention = nn.Module:extend('SRAttention')
M.Attention = Attention

function Attention:__init(dim, num_heads, sr_ratio)
  if dim % num_heads ~= 0 then error(string.format('PVT attention: dim %d is not divisible by %d heads', dim, num_heads), 2) end
  self.num_heads, self.sr_ratio = num_heads, sr_ratio
  self.scale = (dim / num_heads) ^ -0.5
  self.q = nn.Linear(dim, dim)
  self.kv = nn.Linear(dim, dim * 2)
  self.proj = nn.Linear(dim, dim)
  self.sr = nn.Conv2d(dim, dim, 1)
  self.norm = nn.LayerNorm(dim)
end

function Attention:forward(x, H, W)
  local B, C = x:size(0), x:size(2)
  local grid = x:permute(0, 2, 1):reshape(B, C, H, W)
  if self.sr_ratio > 1 then grid = T.F.avg_pool2d(grid, self.sr_ratio) end
  local reduced = self.norm(self.sr(grid):reshape(B, C, -1):permute(0, 2, 1))
  -- heads straight from the q and kv projections, merged in the output
  local o = T.F.packed_attention(self.q(x), self.num_heads, { kv = self.kv(reduced), scale = self.scale })
  return self.proj(o)
end

-- A 2x2 stride-2 conv (no norm).
local PatchMerge = nn.Module:extend('PatchMerge')
M.PatchMerge = PatchMerge

function PatchMerge:__init(in_chans, embed_dim)
  self.proj = nn.Conv2d(in_chans, embed_dim, 2, { stride = 2 })
end

function PatchMerge:forward(x, H, W)
  local N, C = x:size(0), x:size(2)
  x = x:permute(0, 2, 1):reshape(N, C, H, W)
  return self.proj(x):flatten(2):transpose(1, 2), H / 2, W / 2
end

local PVTBlock = nn.Module:extend('PVTBlock')
M.PVTBlock = PVTBlock

function PVTBlock:__init(dim, num_heads, sr_ratio, mlp_ratio, drop_path, downsample)
  self.norm1 = nn.LayerNorm(dim)
  self.attn = Attention(dim, num_heads, sr_ratio)
  self.drop_path = nn.DropPath(drop_path or 0)
  self.norm2 = nn.LayerNorm(dim)
  self.mlp = L.Mlp(dim, math.floor(dim * mlp_ratio))
  if downsample then self.downsample = downsample end
end

function PVTBlock:forward(x, H, W)
  if self.downsample then x, H, W = self.downsample(x, H, W) end
  x = x + self.drop_path(self.attn(self.norm1(x), H, W))
  x = x + self.drop_path(self.mlp(self.norm2(x)))
  return x, H, W
end

local PatchEmbed = nn.Module:extend('PatchEmbed')
M.PatchEmbed = PatchEmbed

function PatchEmbed:__init(patch_size, in_chans, embed_dim)
  self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, { stride = patch_size })
end

function PatchEmbed:forward(x) return self.proj(x):flatten(2):transpose(1, 2) end

local function build_blocks(model, a, drop_path_rate)
  local total = 0
  for _, d in ipairs(a.depths) do total = total + d end
  local rates = L.drop_path_rates(drop_path_rate or 0, total)
  model.blocks = nn.ModuleList{}
  local idx = 1
  for s = 1, #a.depths do
    for dep = 0, a.depths[s] - 1 do
      local downsample = (s > 1 and dep == 0) and PatchMerge(a.embed_dims[s - 1], a.embed_dims[s]) or nil
      model.blocks:append(PVTBlock(a.embed_dims[s], a.num_heads[s], a.sr_ratios[s], a.mlp_ratios[s], rates[idx], downsample))
      idx = idx + 1
    end
  end
  return a.embed_dims[#a.embed_dims]
end

local function run_blocks(model, x, H, W)
  for _, blk in model.blocks:iter() do x, H, W = blk(x, H, W) end
  return x
end

-- ---- UM-MAE pre-training -------------------------------------------------------------------------
local MaskedAutoencoderPVT = nn.Module:extend('MaskedAutoencoderPVT')
M.MaskedAutoencoderPVT = MaskedAutoencoderPVT

local mae_defaults = {
  img_size = 224, patch_size = 4, in_chans = 3, stride = 16, embed_dims = { 64, 128, 320, 512 },
  depths = { 3, 4, 6, 3 }, num_heads = { 1, 2, 5, 8 }, mlp_ratios = { 8, 8, 4, 4 }, sr_ratios = { 4, 2, 1, 1 },
  decoder_embed_dim = 512, decoder_depth = 2, decoder_num_heads = 16, decoder_mlp_ratio = 4,
  norm_layer = { type = 'LayerNorm', eps = 1e-5 }, norm_pix_loss = false, vis_mask_ratio = 0, decoder_pos = 'official',
}

function MaskedAutoencoderPVT:__init(kwargs)
  local a = L.args('MaskedAutoencoderPVT', kwargs, mae_defaults)
  self.config = a
  local eps = L.norm_eps(a.norm_layer)
  self.tokens_per_patch, self.token_grid = a.stride / a.patch_size, a.img_size / a.patch_size
  if a.vis_mask_ratio > 0 then self.vis_mask_token = nn.Parameter(T.zeros(1, 1, a.embed_dims[1])) end
  self.patch_embed = PatchEmbed(a.patch_size, a.in_chans, a.embed_dims[1])
  self.pos_embed = nn.Parameter(T.zeros(1, self.token_grid ^ 2, a.embed_dims[1]), false)
  local out_dim = build_blocks(self, a)
  self.norm = nn.LayerNorm(out_dim, { eps = eps })
  umd.build(self, a, out_dim, eps, a.decoder_mlp_ratio)
  self:initialize_weights()
end

function MaskedAutoencoderPVT:initialize_weights()
  T.no_grad(function() self.pos_embed:copy_(L.sincos_pos_embed(self.config.embed_dims[1], self.token_grid, false)) end)
  umd.init_tokens(self)
  L.init_weights(self)
  L.init_patch_embed(self.patch_embed.proj)
end

function MaskedAutoencoderPVT:forward_encoder(imgs, mask, new_mask)
  local a, s, G = self.config, self.tokens_per_patch, self.token_grid
  local C = a.embed_dims[1]
  local x = self.patch_embed(imgs)
  local N = x:size(0)
  x = x:view(N, G, G, C)
  if self.vis_mask_token then -- secondary-masked patches become the raw vis_mask_token
    local keep = L.upsample_mask(new_mask:logical_not(), s, x)
    local swapped = L.upsample_mask(new_mask:logical_and(mask:logical_not()), s, x)
    x = x * keep + self.vis_mask_token * swapped
  end
  x = T.uniform_compact(x, mask, s)
  -- the fixed positions travel with their tokens into the compact map
  x = x + T.uniform_compact(self.pos_embed:view(1, G, G, C):expand(N, G, G, C), mask, s)
  local H = G / 2
  return self.norm(run_blocks(self, x:reshape(N, -1, C), H, H))
end

function MaskedAutoencoderPVT:forward(imgs, mask, opts)
  opts = opts or {}
  local new_mask = umd.secondary_mask(self, mask, opts)
  local latent = self:forward_encoder(imgs, mask, new_mask)
  local pred, removed = umd.forward_decoder(self, latent, mask)
  return umd.loss(self, imgs, pred, removed), pred, { latent = latent, new_mask = new_mask }
end

-- ---- SimMIM ----------------------------------------------------------------------------------------
local SimMIMPVT = nn.Module:extend('SimMIMPVT')
M.SimMIMPVT = SimMIMPVT

local simmim_defaults = {
  img_size = 224, patch_size = 4, in_chans = 3, stride = 16, embed_dims = { 64, 128, 320, 512 },
  depths = { 3, 4, 6, 3 }, num_heads = { 1, 2, 5, 8 }, mlp_ratios = { 8, 8, 4, 4 }, sr_ratios = { 8, 4, 2, 1 },
  norm_layer = { type = 'LayerNorm', eps = 1e-5 }, norm_pix_loss = false,
}

function SimMIMPVT:__init(kwargs)
  local a = L.args('SimMIMPVT', kwargs, simmim_defaults)
  self.config = a
  local eps = L.norm_eps(a.norm_layer)
  self.tokens_per_patch, self.token_grid = a.stride / a.patch_size, a.img_size / a.patch_size
  self.mask_token = nn.Parameter(T.zeros(1, 1, a.embed_dims[1]))
  self.patch_embed = PatchEmbed(a.patch_size, a.in_chans, a.embed_dims[1])
  self.pos_embed = nn.Parameter(T.zeros(1, self.token_grid ^ 2, a.embed_dims[1]), false)
  local out_dim = build_blocks(self, a)
  self.norm = nn.LayerNorm(out_dim, { eps = eps })
  self.decoder_pred = nn.Linear(out_dim, 4 * a.stride * a.stride * a.in_chans)
  self:initialize_weights()
end

function SimMIMPVT:initialize_weights()
  T.no_grad(function() self.pos_embed:copy_(L.sincos_pos_embed(self.config.embed_dims[1], self.token_grid, false)) end)
  nn.init.normal_(self.mask_token, 0, 0.02)
  L.init_weights(self)
  L.init_patch_embed(self.patch_embed.proj)
end

function SimMIMPVT:forward(imgs, mask)
  local G = self.token_grid
  local x = self.patch_embed(imgs)
  local N = x:size(0)
  local w = L.upsample_mask(mask, self.tokens_per_patch, x):view(N, G * G, 1)
  x = x * (1 - w) + self.mask_token * w + self.pos_embed
  x = self.norm(run_blocks(self, x, G, G))
  local pred = umd.shuffle_predictions(self.decoder_pred(x))
  local loss, removed = umd.simmim_loss(self, imgs, pred, mask)
  return loss, pred, { latent = x, removed = removed }
end

-- ---- the classifier --------------------------------------------------------------------------------
local PVT = nn.Module:extend('PVT')
M.PVT = PVT

local cls_defaults = {
  img_size = 224, num_classes = 1000, patch_size = 4, in_chans = 3, embed_dims = { 64, 128, 320, 512 },
  depths = { 3, 4, 6, 3 }, num_heads = { 1, 2, 5, 8 }, mlp_ratios = { 8, 8, 4, 4 }, sr_ratios = { 8, 4, 2, 1 },
  drop_path_rate = 0.1, norm_layer = { type = 'LayerNorm', eps = 1e-5 }, global_pool = true,
}

function PVT:__init(kwargs)
  local a = L.args('PVT', kwargs, cls_defaults)
  if not a.global_pool then error('PVT: only global_pool = true is supported (the official classifier pools)', 2) end
  self.config = a
  local eps = L.norm_eps(a.norm_layer)
  self.token_grid = a.img_size / a.patch_size
  self.patch_embed = PatchEmbed(a.patch_size, a.in_chans, a.embed_dims[1])
  self.pos_embed = nn.Parameter(T.zeros(1, self.token_grid ^ 2, a.embed_dims[1])) -- learnable, zero start
  local out_dim = build_blocks(self, a, a.drop_path_rate)
  self.fc_norm = nn.LayerNorm(out_dim, { eps = eps })
  self.head = a.num_classes > 0 and nn.Linear(out_dim, a.num_classes) or nn.Identity()
  L.init_weights(self)
end

function PVT:forward_features(imgs)
  local G = self.token_grid
  return run_blocks(self, self.patch_embed(imgs) + self.pos_embed, G, G)
end

function PVT:forward(imgs) return self.head(self.fc_norm(self:forward_features(imgs):mean(1))) end

function PVT:no_weight_decay() return { pos_embed = true } end

-- ---- factories -------------------------------------------------------------------------------------
local with = L.merge

local small = { img_size = 256, patch_size = 4, in_chans = 3, embed_dims = { 64, 128, 320, 512 }, depths = { 3, 4, 6, 3 },
  num_heads = { 1, 2, 5, 8 }, mlp_ratios = { 8, 8, 4, 4 }, norm_layer = { type = 'LayerNorm', eps = 1e-6 } }

M.factories = {
  mae_pvt_small_256 = function(kw)
    return MaskedAutoencoderPVT(with(small, with({ stride = 16, sr_ratios = { 4, 2, 1, 1 }, decoder_embed_dim = 512,
      decoder_depth = 2, decoder_num_heads = 16, decoder_mlp_ratio = 4 }, kw)))
  end,
  simmim_pvt_small_256 = function(kw) return SimMIMPVT(with(small, with({ stride = 16, sr_ratios = { 8, 4, 2, 1 } }, kw))) end,
  pvt_small_256 = function(kw) return PVT(with(small, with({ sr_ratios = { 8, 4, 2, 1 } }, kw))) end,
}

return M
