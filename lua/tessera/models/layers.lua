-- tessera.models.layers — the pieces the UM-MAE model family shares: timm's ViT block, the MLP,
-- fixed sin-cos positions, patchify, the official initialization and the masked losses.
-- Names and shapes are the official code's (github implus/UM-MAE), so state dicts match.
local each = require 'tessera.each'
local core = require 'tessera.core'
local T = core.T
local nn = T.nn

local L = {}

-- ---- options -----------------------------------------------------------------------------------
-- Constructor arguments arrive under the official names (as in the reference files' ctor_kwargs).
-- norm_layer is {type = 'LayerNorm', eps = E} or a number (the eps).
-- The image must tile into patches, and into the stride-sized mask patches where a model has them.
local function check_tiling(class, a)
  for _, key in ipairs { 'patch_size', 'stride' } do
    local size = a[key]
    if type(a.img_size) == 'number' and type(size) == 'number' then
      local grid = a.img_size / size
      if grid < 1 or grid ~= math.floor(grid) then
        error(string.format('%s: img_size %s is not a multiple of %s %s', class, tostring(a.img_size), key,
          tostring(size)), 0)
      end
    end
  end
end

function L.args(class, given, defaults)
  local out = nn.options(class, given, defaults)
  for k, v in each(out) do if v == nn.NONE then out[k] = nil end end   -- nn.NONE given for a key
  check_tiling(class, out)
  return out
end

-- A copy of `defaults` with `overrides` applied (factories build on the official configurations).
L.merge = core.merge

function L.norm_eps(norm_layer)
  if type(norm_layer) == 'number' then return norm_layer end
  if type(norm_layer) == 'table' then
    if norm_layer.type and norm_layer.type ~= 'LayerNorm' then
      error('norm_layer: only LayerNorm is supported, got ' .. tostring(norm_layer.type), 3)
    end
    return norm_layer.eps or 1e-5
  end
  return 1e-5
end

-- ---- building blocks ---------------------------------------------------------------------------
local Mlp = nn.Module:extend('Mlp')
L.Mlp = Mlp
function Mlp:__init(in_features, hidden_features, out_features, drop)
  self.fc1 = nn.Linear(in_features, hidden_features or in_features)
  self.act = nn.GELU()
  self.fc2 = nn.Linear(hidden_features or in_features, out_features or in_features)
  self.drop = drop or 0
end
function Mlp:forward(x)
  x = self.act(self.fc1(x))
  if self.drop > 0 then x = T.F.dropout(x, self.drop, self.training) end
  x = self.fc2(x)
  if self.drop > 0 then x = T.F.dropout(x, self.drop, self.training) end
  return x
end

-- Multi-head self-attention with a fused qkv projection (timm's Attention): qkv rows are q, then
-- k, then v, each split into heads of consecutive head_dim rows.
local Attention = nn.Module:extend('Attention')
L.Attention = Attention
function Attention:__init(dim, num_heads, qkv_bias)
  if dim % num_heads ~= 0 then error(string.format('Attention: dim %d is not divisible by num_heads %d', dim, num_heads), 2) end
  self.num_heads, self.head_dim = num_heads, dim / num_heads
  self.scale = self.head_dim ^ -0.5
  self.qkv = nn.Linear(dim, dim * 3, { bias = qkv_bias ~= false })
  self.proj = nn.Linear(dim, dim)
end

-- q, k, v as [B, heads, N, head_dim] views of one projection output [B, N, 3 * dim].
function L.split_heads(t, parts, heads)
  local B, N = t:size(0), t:size(1)
  local hd = t:size(2) / (parts * heads)
  local v = t:view(B, N, parts, heads, hd):permute(2, 0, 3, 1, 4)
  local out = {}
  for i = 0, parts - 1 do out[i + 1] = v:select(0, i) end
  return unpack(out)
end

-- [B, heads, N, head_dim] → [B, N, heads * head_dim]
function L.merge_heads(t)
  local B, H, N, hd = t:size(0), t:size(1), t:size(2), t:size(3)
  return t:transpose(1, 2):reshape(B, N, H * hd)
end

-- q, k and v go to the attention packed as the qkv projection made them (no split, no merge copy).
function Attention:forward(x, bias)
  return self.proj(T.F.packed_attention(self.qkv(x), self.num_heads, { bias = bias, scale = self.scale }))
end

-- timm's pre-norm transformer Block (the ViT encoder and every MAE decoder).
local Block = nn.Module:extend('Block')
L.Block = Block
function Block:__init(dim, num_heads, mlp_ratio, opts)
  opts = opts or {}
  local eps = opts.eps or 1e-6
  self.norm1 = nn.LayerNorm(dim, { eps = eps })
  self.attn = Attention(dim, num_heads, opts.qkv_bias)
  self.drop_path = nn.DropPath(opts.drop_path or 0)
  self.norm2 = nn.LayerNorm(dim, { eps = eps })
  self.mlp = Mlp(dim, math.floor(dim * (mlp_ratio or 4)))
end
function Block:forward(x)
  x = x + self.drop_path(self.attn(self.norm1(x)))
  return x + self.drop_path(self.mlp(self.norm2(x)))
end

-- Drop-path rates growing linearly over the blocks, as torch.linspace(0, rate, depth).
function L.drop_path_rates(rate, depth)
  local out = {}
  for i = 1, depth do out[i] = depth > 1 and rate * (i - 1) / (depth - 1) or 0 end
  return out
end

-- ---- positions ---------------------------------------------------------------------------------
-- MAE's fixed 2-D sin-cos table [1, (cls +) G*G, D], computed in float64 and stored as float32:
-- the first D/2 values encode the column, the last D/2 the row; each half is sin then cos of
-- p * 10000^(-k / (D/4)).
function L.sincos_pos_embed(dim, grid, cls_token)
  if dim % 4 ~= 0 then error('sincos_pos_embed: the width must be divisible by 4, got ' .. dim, 2) end
  local quarter = dim / 4
  local values = {}
  if cls_token then for _ = 1, dim do values[#values + 1] = 0 end end
  for r = 0, grid - 1 do
    for c = 0, grid - 1 do
      for _, p in ipairs { c, r } do
        for k = 0, quarter - 1 do values[#values + 1] = math.sin(p * 10000 ^ (-k / quarter)) end
        for k = 0, quarter - 1 do values[#values + 1] = math.cos(p * 10000 ^ (-k / quarter)) end
      end
    end
  end
  local n = grid * grid + (cls_token and 1 or 0)
  return T.tensor(values, { dtype = 'float64' }):float():view(1, n, dim)
end

-- (row, col) of every token of an h x w grid as float32 [1, h, w, 2] (on `device`, default the CPU).
function L.position_grid(h, w, device)
  local rows = T.arange(h, { dtype = 'float32', device = device }):view(h, 1, 1):expand(h, w, 1)
  local cols = T.arange(w, { dtype = 'float32', device = device }):view(1, w, 1):expand(h, w, 1)
  return T.cat({ rows, cols }, 2):unsqueeze(0)
end

-- ---- patches and masks ---------------------------------------------------------------------------
-- [N, 3, h*p, w*p] → [N, h*w, p*p*3], each row ordered (pixel row, pixel column, channel).
function L.patchify(imgs, p)
  local N, C, H, W = imgs:size(0), imgs:size(1), imgs:size(2), imgs:size(3)
  if H % p ~= 0 or W % p ~= 0 then
    error(string.format('patchify: image %dx%d is not divisible into %d-pixel patches', H, W, p), 2)
  end
  local h, w = H / p, W / p
  return imgs:reshape(N, C, h, p, w, p):permute(0, 2, 4, 3, 5, 1):reshape(N, h * w, p * p * C)
end

-- The inverse of patchify: [N, h*w, p*p*3] → [N, 3, h*p, w*p] (square grids).
function L.unpatchify(x, p, channels)
  channels = channels or 3
  local N, Lp = x:size(0), x:size(1)
  local h = math.floor(math.sqrt(Lp) + 0.5)
  return x:reshape(N, h, h, p, p, channels):permute(0, 5, 1, 3, 2, 4):reshape(N, channels, h * p, h * p)
end

-- Per image, the patch indices [N, L] with the visible ones first, each part in raster order,
-- and the number of visible patches V (the same for every image).
function L.visible_first(mask)
  local _, order = mask:to('int64'):sort{ dim = 1, stable = true }
  local visible = mask:size(1) - mask[0]:to('int64'):sum():item()
  return order, visible
end

-- A patch mask [N, M*M] (1 = on) as a token mask [N, M*s, M*s, 1] (s tokens per patch side) in the
-- dtype and on the device of `like` (masks are usually made on the host; the model may run elsewhere).
function L.upsample_mask(mask, s, like)
  local N, M = mask:size(0), math.floor(math.sqrt(mask:size(1)) + 0.5)
  return mask:to{ dtype = like.dtype, device = like.device }:view(N, M, 1, M, 1, 1):expand(N, M, s, M, s, 1):reshape(N, M * s, M * s, 1)
end

-- Rows of x [N, L, D] picked per image by indices [N, K] (on any device) → [N, K, D].
function L.take_rows(x, idx)
  local N, D = x:size(0), x:size(2)
  return x:gather(1, idx:to(x.device):unsqueeze(-1):expand(N, idx:size(1), D))
end

-- MAE's target normalization: per patch, (t - mean) / sqrt(var + 1e-6), unbiased variance.
function L.normalize_patches(t)
  local mean = t:mean(-1, true)
  local var = t:var{ dim = -1, keepdim = true }
  return (t - mean) / (var + 1e-6):sqrt()
end

-- ---- the official initialization ------------------------------------------------------------------
-- xavier_uniform for Linear (zero bias), LayerNorm to 1/0, Conv2d to N(0, sqrt(2 / fan_out))
-- with fan_out = kh*kw*out/groups (zero bias) unless conv_init is false.
function L.init_weights(model, conv_init)
  model:apply(function(m)
    if m.__name == 'Linear' then
      nn.init.xavier_uniform_(m.weight)
      if m.bias then nn.init.zeros_(m.bias) end
    elseif m.__name == 'LayerNorm' and m.weight then
      nn.init.ones_(m.weight)
      if m.bias then nn.init.zeros_(m.bias) end
    elseif m.__name == 'Conv2d' and conv_init ~= false then
      local fan_out = m.kernel_size[1] * m.kernel_size[2] * m.out_channels / m.groups
      nn.init.normal_(m.weight, 0, math.sqrt(2 / fan_out))
      if m.bias then nn.init.zeros_(m.bias) end
    end
  end)
end

-- The patch embedding is initialized like a Linear layer over the flattened kernel.
function L.init_patch_embed(conv)
  T.no_grad(function() nn.init.xavier_uniform_(conv.weight:view(conv.weight:size(0), -1)) end)
end

return L
