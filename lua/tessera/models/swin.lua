-- tessera.models.swin — Swin Transformer with UM-MAE's continuous relative position bias:
-- the UM-MAE pre-training model (MaskedAutoencoderSwin), SimMIM (SimMIMSwin) and the classifier
-- (Swin). Semantics and parameter names follow the official models_mae_swin.py,
-- models_simmim_swin.py and models_swin.py (github implus/UM-MAE).
local T = require 'tessera.core'.T
local nn = T.nn
local L = require 'tessera.models.layers'
local umd = require 'tessera.models.um_decoder'

local M = {}

-- ---- tensor lifetimes ----------------------------------------------------------------------------
-- A block makes many temporaries. Dropping our reference at once (t:free()) returns a temporary's
-- memory right away, or at backward when autograd saved it, instead of at the next garbage
-- collection, which at a step's peak can be hundreds of megabytes later.
local function release(...)
  for i = 1, select('#', ...) do
    local t = select(i, ...)
    if t ~= nil then t:free() end
  end
end

-- `new`, after freeing `old` (old is not used any more: `x = replace(x, f(x))`).
local function replace(old, new)
  old:free()
  return new
end

-- ---- windows -----------------------------------------------------------------------------------
-- [B, H, W, C] → [B * nW, ws * ws, C], windows in row-major order.
local function window_partition(x, ws)
  local B, H, W, C = x:size(0), x:size(1), x:size(2), x:size(3)
  return x:view(B, H / ws, ws, W / ws, ws, C):permute(0, 1, 3, 2, 4, 5):reshape(-1, ws * ws, C)
end

local function window_reverse(windows, ws, H, W)
  local C = windows:size(-1)
  local B = windows:size(0) / ((H / ws) * (W / ws))
  return windows:view(B, H / ws, W / ws, ws, ws, C):permute(0, 1, 3, 2, 4, 5):reshape(B, H, W, C)
end

-- Standard Swin shifted-window mask [nW, N, N]: on the rolled grid, rows and columns fall into the
-- ranges [0, H-ws), [H-ws, H-shift), [H-shift, H); a pair from different regions gets -100.
local function shifted_window_mask(H, W, ws, shift)
  local function region(i, n) return i < n - ws and 0 or i < n - shift and 1 or 2 end
  local values = {}
  for r = 0, H - 1 do for c = 0, W - 1 do values[#values + 1] = region(r, H) * 3 + region(c, W) end end
  local labels = T.tensor(values):view(1, H, W, 1)
  local windows = window_partition(labels, ws):squeeze(-1) -- [nW, N]
  local differ = windows:unsqueeze(1):ne(windows:unsqueeze(2))
  return T.where(differ, -100, 0)
end
M.shifted_window_mask = shifted_window_mask

-- ---- attention with a continuous relative position bias ----------------------------------------
local WindowAttention = nn.Module:extend('WindowAttention')
M.WindowAttention = WindowAttention

function WindowAttention:__init(dim, window_size, num_heads, posmlp_dim)
  self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
  self.scale = (dim / num_heads) ^ -0.5
  -- bias[h, i, j] = posmlp(sign(d) log(1 + |d|)) with d = pos[j] - pos[i], per image and window
  self.posmlp = nn.Sequential(nn.Conv2d(2, posmlp_dim, 1), nn.ReLU(), nn.Conv2d(posmlp_dim, num_heads, 1))
  self.qkv = nn.Linear(dim, dim * 3)
  self.proj = nn.Linear(dim, dim)
end

-- x: [B * nW, N, C] windows; pos: [P * nW, 2, N] token positions per window (P = B, or 1 when all
-- images share them); mask: [nW, N, N] or nil.
function WindowAttention:forward(x, pos, mask, nW)
  local Bw, N, C = x:size(0), x:size(1), x:size(2)
  local B, H = Bw / nW, self.num_heads
  -- posmlp (Conv1x1, ReLU, Conv1x1) on sign(d) log(1 + |d|) of d = pos[j] - pos[i], fused: the
  -- [P * nW, posmlp_dim, N, N] hidden layer is never stored
  local fc1, fc2 = self.posmlp['0'], self.posmlp['2']
  local bias = T.F.relative_position_bias(pos, fc1.weight, fc1.bias, fc2.weight, fc2.bias) -- [P * nW, H, N, N]
  local P = bias:size(0) / nW
  bias = replace(bias, bias:view(P, nW, H, N, N))
  if mask then bias = replace(bias, bias + mask:view(1, nW, 1, N, N)) end
  -- the heads straight from the qkv projection [B, nW, N, 3C]; the output has them merged
  local qkv = self.qkv(x)
  local o = T.F.packed_attention(qkv:view(B, nW, N, 3 * C), H, { bias = bias, scale = self.scale })
  release(qkv, bias)
  o = replace(o, o:view(Bw, N, C))
  return replace(o, self.proj(o))
end

-- LayerNorm, then a 2x2 stride-2 conv; positions keep the top-left entry of each 2x2, halved.
local PatchMerge = nn.Module:extend('PatchMerge')
M.PatchMerge = PatchMerge

function PatchMerge:__init(in_chans, embed_dim, eps)
  self.norm = nn.LayerNorm(in_chans, { eps = eps })
  self.proj = nn.Conv2d(in_chans, embed_dim, 2, { stride = 2 })
end

function PatchMerge:forward(x, pos_hw)
  local N, Lx, C = x:size(0), x:size(1), x:size(2)
  local H, W = pos_hw:size(1), pos_hw:size(2)
  x = self.norm(x):permute(0, 2, 1):reshape(N, C, H, W)
  x = self.proj(x):flatten(2):transpose(1, 2)
  return x, pos_hw:slice(1, 0, nil, 2):slice(2, 0, nil, 2) / 2
end

-- ---- the block ---------------------------------------------------------------------------------
local SwinBlock = nn.Module:extend('SwinBlock')
M.SwinBlock = SwinBlock

-- opts: window_size, shift_size, mlp_ratio, posmlp_dim, drop_path, downsample (a PatchMerge)
function SwinBlock:__init(dim, input_resolution, num_heads, opts)
  local ws, shift = opts.window_size, opts.shift_size or 0
  local res = math.min(input_resolution[1], input_resolution[2])
  if res <= ws then shift, ws = 0, res end -- a window as large as the grid: no partition, no shift
  self.window_size, self.shift_size = ws, shift
  self.norm1 = nn.LayerNorm(dim)
  self.attn = WindowAttention(dim, ws, num_heads, opts.posmlp_dim)
  self.drop_path = nn.DropPath(opts.drop_path or 0)
  self.norm2 = nn.LayerNorm(dim)
  self.mlp = L.Mlp(dim, math.floor(dim * opts.mlp_ratio))
  if shift > 0 then
    self.attn_mask = nn.Buffer(shifted_window_mask(input_resolution[1], input_resolution[2], ws, shift), false)
  end
  if opts.downsample then self.downsample = opts.downsample end
end

-- x: [B, H*W, C]; pos_hw: [B or 1, H, W, 2] absolute (row, col) of every token.
function SwinBlock:forward(x, pos_hw)
  if self.downsample then x, pos_hw = self.downsample(x, pos_hw) end
  local B, C = x:size(0), x:size(2)
  local H, W = pos_hw:size(1), pos_hw:size(2)
  if x:size(1) ~= H * W then
    error(string.format('SwinBlock: %d tokens for a %dx%d position grid', x:size(1), H, W), 2)
  end
  local ws, s = self.window_size, self.shift_size
  local normed = self.norm1(x)
  local grid, pos = normed:view(B, H, W, C), pos_hw
  if s > 0 then
    grid = replace(grid, grid:roll({ -s, -s }, { 1, 2 }))
    pos = pos:roll({ -s, -s }, { 1, 2 })
  end
  local nW = (H / ws) * (W / ws)
  local windows = window_partition(grid, ws)
  release(normed, grid)
  windows = replace(windows, self.attn(windows, window_partition(pos, ws):transpose(1, 2), self.attn_mask, nW))
  grid = window_reverse(windows, ws, H, W)
  windows:free()
  if s > 0 then grid = replace(grid, grid:roll({ s, s }, { 1, 2 })) end
  local branch = grid:reshape(B, H * W, C)
  grid:free()
  local dropped = self.drop_path(branch)
  branch:free()
  local y = x + dropped
  dropped:free()
  branch = self.norm2(y)
  branch = replace(branch, self.mlp(branch))
  dropped = self.drop_path(branch)
  branch:free()
  local out = y + dropped
  release(dropped, y)
  return out, pos_hw
end

-- ---- shared pieces -------------------------------------------------------------------------------
local PatchEmbed = nn.Module:extend('PatchEmbed')
M.PatchEmbed = PatchEmbed

function PatchEmbed:__init(patch_size, in_chans, embed_dim, eps)
  self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, { stride = patch_size })
  self.norm = nn.LayerNorm(embed_dim, { eps = eps })
end

function PatchEmbed:forward(x) return self.norm(self.proj(x):flatten(2):transpose(1, 2)) end

-- The encoder blocks: stage s has embed_dim * 2^s channels at grid // 2^(s + grid_shift);
-- each later stage starts with a PatchMerge.
local function build_blocks(model, a, grid, grid_shift, drop_path_rate)
  local eps = L.norm_eps(a.norm_layer)
  local total = 0
  for _, d in ipairs(a.depths) do total = total + d end
  local rates = L.drop_path_rates(drop_path_rate or 0, total)
  model.blocks = nn.ModuleList{}
  local idx = 1
  for s = 0, #a.depths - 1 do
    local dim, res = a.embed_dim * 2 ^ s, grid / 2 ^ (s + grid_shift)
    for dep = 0, a.depths[s + 1] - 1 do
      model.blocks:append(SwinBlock(dim, { res, res }, a.num_heads[s + 1], {
        window_size = a.window_size, shift_size = dep % 2 == 0 and 0 or math.floor(a.window_size / 2),
        mlp_ratio = a.mlp_ratio, posmlp_dim = a.posmlp_dim, drop_path = rates[idx],
        downsample = (s > 0 and dep == 0) and PatchMerge(dim / 2, dim, eps) or nil,
      }))
      idx = idx + 1
    end
  end
  return a.embed_dim * 2 ^ (#a.depths - 1)
end

local function run_blocks(model, x, pos_hw)
  for _, blk in model.blocks:iter() do x, pos_hw = blk(x, pos_hw) end
  return x
end

-- ---- UM-MAE pre-training -----------------------------------------------------------------------
local MaskedAutoencoderSwin = nn.Module:extend('MaskedAutoencoderSwin')
M.MaskedAutoencoderSwin = MaskedAutoencoderSwin

local mae_defaults = {
  img_size = 256, patch_size = 4, in_chans = 3, stride = 16, embed_dim = 96, depths = { 2, 2, 6, 2 },
  num_heads = { 3, 6, 12, 24 }, mlp_ratio = 4, window_size = 8, posmlp_dim = 32, decoder_embed_dim = 512,
  decoder_depth = 2, decoder_num_heads = 16, norm_layer = { type = 'LayerNorm', eps = 1e-5 },
  norm_pix_loss = false, vis_mask_ratio = 0, decoder_pos = 'official',
}

function MaskedAutoencoderSwin:__init(kwargs)
  local a = L.args('MaskedAutoencoderSwin', kwargs, mae_defaults)
  self.config = a
  local eps = L.norm_eps(a.norm_layer)
  self.tokens_per_patch = a.stride / a.patch_size
  self.token_grid = a.img_size / a.patch_size
  if a.vis_mask_ratio > 0 then self.vis_mask_token = nn.Parameter(T.zeros(1, 1, a.embed_dim)) end
  self.patch_embed = PatchEmbed(a.patch_size, a.in_chans, a.embed_dim, eps)
  local out_dim = build_blocks(self, a, self.token_grid, 1)
  self.norm = nn.LayerNorm(out_dim, { eps = eps })
  umd.build(self, a, out_dim, eps)
  self:initialize_weights()
end

function MaskedAutoencoderSwin:initialize_weights()
  umd.init_tokens(self)
  L.init_weights(self)
  L.init_patch_embed(self.patch_embed.proj)
end

-- imgs [N, 3, H, W], mask [N, L] (1 = removed; US: one visible per 2x2 group).
-- opts.new_mask: the secondary-masked mask (else drawn from opts.noise or the generator).
function MaskedAutoencoderSwin:forward_encoder(imgs, mask, new_mask)
  local a, s, G = self.config, self.tokens_per_patch, self.token_grid
  local x = self.patch_embed(imgs)
  local N = x:size(0)
  x = x:view(N, G, G, a.embed_dim)
  if self.vis_mask_token then
    -- visible patches keep their features, secondary-masked ones become LN(vis_mask_token)
    local keep = L.upsample_mask(new_mask:logical_not(), s, x)
    local swapped = L.upsample_mask(new_mask:logical_and(mask:logical_not()), s, x)
    x = x * keep + self.patch_embed.norm(self.vis_mask_token) * swapped
  end
  x = T.uniform_compact(x, mask, s)
  local grid = L.position_grid(G, G, x.device):expand(N, G, G, 2)
  local pos_hw = T.uniform_compact(grid, mask, s)
  x = run_blocks(self, x:reshape(N, -1, a.embed_dim), pos_hw)
  return self.norm(x)
end

function MaskedAutoencoderSwin:forward(imgs, mask, opts)
  opts = opts or {}
  local new_mask = umd.secondary_mask(self, mask, opts)
  local latent = self:forward_encoder(imgs, mask, new_mask)
  local pred, removed = umd.forward_decoder(self, latent, mask)
  local loss = umd.loss(self, imgs, pred, removed)
  return loss, pred, { latent = latent, new_mask = new_mask }
end

-- ---- SimMIM --------------------------------------------------------------------------------------
local SimMIMSwin = nn.Module:extend('SimMIMSwin')
M.SimMIMSwin = SimMIMSwin

local simmim_defaults = {
  img_size = 256, patch_size = 4, in_chans = 3, stride = 16, embed_dim = 96, depths = { 2, 2, 6, 2 },
  num_heads = { 3, 6, 12, 24 }, mlp_ratio = 4, window_size = 8, posmlp_dim = 32,
  norm_layer = { type = 'LayerNorm', eps = 1e-5 }, norm_pix_loss = false,
}

function SimMIMSwin:__init(kwargs)
  local a = L.args('SimMIMSwin', kwargs, simmim_defaults)
  self.config = a
  local eps = L.norm_eps(a.norm_layer)
  self.tokens_per_patch, self.token_grid = a.stride / a.patch_size, a.img_size / a.patch_size
  self.mask_token = nn.Parameter(T.zeros(1, 1, a.embed_dim))
  self.patch_embed = PatchEmbed(a.patch_size, a.in_chans, a.embed_dim, eps)
  local out_dim = build_blocks(self, a, self.token_grid, 0)
  self.norm = nn.LayerNorm(out_dim, { eps = eps })
  self.decoder_pred = nn.Linear(out_dim, 4 * a.stride * a.stride * a.in_chans)
  self:initialize_weights()
end

function SimMIMSwin:initialize_weights()
  nn.init.normal_(self.mask_token, 0, 0.02)
  L.init_weights(self)
  L.init_patch_embed(self.patch_embed.proj)
end

function SimMIMSwin:forward(imgs, mask)
  local a, G = self.config, self.token_grid
  local x = self.patch_embed(imgs)
  local N = x:size(0)
  local w = L.upsample_mask(mask, self.tokens_per_patch, x):view(N, G * G, 1)
  x = x * (1 - w) + self.mask_token * w
  x = self.norm(run_blocks(self, x, L.position_grid(G, G, x.device)))
  local pred = umd.shuffle_predictions(self.decoder_pred(x))
  local loss, removed = umd.simmim_loss(self, imgs, pred, mask)
  return loss, pred, { latent = x, removed = removed }
end

-- ---- the classifier ------------------------------------------------------------------------------
local Swin = nn.Module:extend('Swin')
M.Swin = Swin

local cls_defaults = {
  img_size = 256, num_classes = 1000, patch_size = 4, in_chans = 3, embed_dim = 96, depths = { 2, 2, 6, 2 },
  num_heads = { 3, 6, 12, 24 }, mlp_ratio = 4, window_size = 16, posmlp_dim = 32, drop_path_rate = 0.1,
  norm_layer = { type = 'LayerNorm', eps = 1e-5 }, global_pool = true, with_cp = false,
}

function Swin:__init(kwargs)
  local a = L.args('Swin', kwargs, cls_defaults)
  if not a.global_pool then error('Swin: only global_pool = true is supported (the official classifier pools)', 2) end
  self.config = a
  local eps = L.norm_eps(a.norm_layer)
  self.token_grid = a.img_size / a.patch_size
  self.patch_embed = PatchEmbed(a.patch_size, a.in_chans, a.embed_dim, eps)
  local out_dim = build_blocks(self, a, self.token_grid, 0, a.drop_path_rate)
  self.fc_norm = nn.LayerNorm(out_dim, { eps = eps })
  self.head = a.num_classes > 0 and nn.Linear(out_dim, a.num_classes) or nn.Identity()
  L.init_weights(self)
end

function Swin:forward_features(imgs)
  local G = self.token_grid
  return run_blocks(self, self.patch_embed(imgs), L.position_grid(G, G, imgs.device))
end

function Swin:forward(imgs)
  return self.head(self.fc_norm(self:forward_features(imgs):mean(1)))
end

-- ---- factories (the official configurations) ------------------------------------------------------
local with = L.merge

local tiny = { img_size = 256, patch_size = 4, in_chans = 3, stride = 16, embed_dim = 96, depths = { 2, 2, 6, 2 },
  num_heads = { 3, 6, 12, 24 }, mlp_ratio = 4, window_size = 8, norm_layer = { type = 'LayerNorm', eps = 1e-6 } }
local large = with(tiny, { embed_dim = 192, depths = { 2, 2, 18, 2 }, num_heads = { 6, 12, 24, 48 }, posmlp_dim = 64 })

M.factories = {
  mae_swin_tiny_256 = function(kw)
    return MaskedAutoencoderSwin(with(tiny, with({ decoder_embed_dim = 512, decoder_depth = 2, decoder_num_heads = 16 }, kw)))
  end,
  mae_swin_large_256 = function(kw)
    return MaskedAutoencoderSwin(with(large, with({ decoder_embed_dim = 512, decoder_depth = 8, decoder_num_heads = 16 }, kw)))
  end,
  simmim_swin_tiny_256 = function(kw) return SimMIMSwin(with(tiny, with({ window_size = 16 }, kw))) end,
  swin_tiny_256 = function(kw)
    local a = with(tiny, with({ window_size = 16, num_classes = 1000 }, kw))
    a.stride = nil
    return Swin(a)
  end,
  swin_large_256 = function(kw)
    local a = with(large, with({ window_size = 16, num_classes = 1000 }, kw))
    a.stride = nil
    return Swin(a)
  end,
}

return M
