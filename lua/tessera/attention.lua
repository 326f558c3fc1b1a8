-- tessera.attention — T.F.scaled_dot_product_attention, PyTorch's signature with tessera's fused
-- kernel (ts_attention): out = softmax(q kᵀ · scale + bias) v in one op and one autograd node.
--
--   T.F.scaled_dot_product_attention(q, k, v)                          q [..., Nq, D], k [..., Nk, D], v [..., Nk, Dv]
--   T.F.scaled_dot_product_attention(q, k, v, attn_mask)
--   T.F.scaled_dot_product_attention(q, k, v, {bias = b, scale = s, is_causal = false, dropout_p = 0})
--
-- bias (alias attn_mask): a floating tensor added to the scores, broadcast to [..., Nq, Nk]
-- (-inf or -100 masks a key), and differentiable; or a boolean mask where true means "keep", as
-- PyTorch's attn_mask, turned into a 0 / -inf bias. A row with every key masked gives zeros.
-- scale defaults to 1 / sqrt(D).
-- is_causal keeps key j for query i when j <= i (top-left aligned, as PyTorch).
--
-- Also here, fused ops the UM-MAE models call (see each below):
--   T.F.packed_attention(qkv, num_heads, {bias =, scale =, kv =})   heads straight from packed projections
--   T.F.relative_position_bias(pos, w1, b1, w2, b2)                  Swin's continuous position bias MLP
local core = require 'tessera.core'
local C, T = core.C, core.T
local wrap, handle = core.wrap, core.handle

T.F = T.F or {}
local F = T.F

local NAME = 'scaled_dot_product_attention'
local VALID = { bias = true, attn_mask = true, scale = true, is_causal = true, dropout_p = true }

-- A "true = keep" boolean mask as an additive bias of q's dtype: 0 where kept, -inf elsewhere.
local function keep_mask_bias(mask, q)
  local opts = { dtype = q.dtype, device = q.device }
  return T.where(mask, T.full({}, 0, opts), T.full({}, -math.huge, opts))
end

-- opts.bias (or its alias opts.attn_mask) as an additive bias tensor of q's dtype, or nil.
local function bias_of(opts, q, op)
  if opts.bias ~= nil and opts.attn_mask ~= nil then
    error(op .. ': give either bias or attn_mask (its alias), not both', 0)
  end
  local what = opts.bias ~= nil and 'bias' or 'attn_mask'
  local mask = opts[what]
  if mask == nil then return nil end
  if not core.is_tensor(mask) then
    error(string.format('%s: %s must be a tensor, got %s', op, what, type(mask)), 0)
  end
  local dtype = mask.dtype
  if dtype == 'bool' then return keep_mask_bias(mask, q) end
  if not mask:is_floating_point() then
    error(string.format('%s: %s must be a floating bias or a boolean keep-mask, got %s', op, what, dtype), 0)
  end
  return mask
end

-- opts.scale as the C calls take it: NaN for the default 1 / sqrt(head dim).
local function scale_of(opts, op)
  local scale = opts.scale
  if scale ~= nil and type(scale) ~= 'number' then
    error(string.format('%s: scale must be a number, got %s', op, type(scale)), 0)
  end
  return scale or 0 / 0
end

local function causal_bias(q, k)
  local nq, nk = q:size(-2), k:size(-2)
  local rows = T.arange(nq, { device = q.device }):view(nq, 1)
  local cols = T.arange(nk, { device = q.device }):view(1, nk)
  return keep_mask_bias(rows:ge(cols), q)
end

function F.scaled_dot_product_attention(q, k, v, opts)
  if core.is_tensor(opts) then opts = { attn_mask = opts } end
  opts = opts or {}
  if type(opts) ~= 'table' then
    error(string.format('%s: the 4th argument must be a mask tensor or an options table, got %s', NAME, type(opts)), 0)
  end
  core.options(NAME, opts, VALID)
  local hq, hk, hv = handle(q, NAME), handle(k, NAME), handle(v, NAME)
  if opts.dropout_p ~= nil and opts.dropout_p ~= 0 then
    error(string.format('%s: dropout_p = %s is not supported by the fused kernel; pass 0 (timm models use 0 '
      .. 'attention dropout)', NAME, tostring(opts.dropout_p)), 0)
  end
  local bias = bias_of(opts, q, NAME)
  if opts.is_causal then
    if bias ~= nil then error(NAME .. ': is_causal cannot be combined with a bias or attn_mask', 0) end
    bias = causal_bias(q, k)
  end
  return wrap(C.ts_attention(hq, hk, hv, bias and handle(bias, NAME) or nil, scale_of(opts, NAME)))
end

-- T.F.packed_attention(qkv, num_heads, {bias =, scale =, kv =}) → [..., N, D]: multi-head attention
-- straight from packed projections, without splitting or merging the heads by copies:
--   qkv [..., N, 3 * D]: q, k and v side by side as timm's qkv Linear makes them (head h in columns
--                        h * hd .. of each D = num_heads * hd wide part), or
--   qkv = q [..., Nq, D] with opts.kv [..., Nk, 2 * D] (k then v), as PVT's q and kv Linears.
-- The result has the heads merged (head h in columns h * hd ..), ready for the output projection;
-- bias (alias attn_mask, as in scaled_dot_product_attention) broadcasts to [..., num_heads, Nq, Nk];
-- scale defaults to 1 / sqrt(hd). The gradient reaches qkv (or q and kv) in its packed layout.
local PACKED_NAME = 'packed_attention'
local PACKED_VALID = { bias = true, attn_mask = true, scale = true, kv = true }

function F.packed_attention(qkv, num_heads, opts)
  opts = opts or {}
  if type(opts) ~= 'table' or core.is_tensor(opts) then
    error(string.format('%s: the 3rd argument must be an options table, got %s', PACKED_NAME, type(opts)), 0)
  end
  core.options(PACKED_NAME, opts, PACKED_VALID)
  local hq = handle(qkv, PACKED_NAME)
  local heads = core.int(num_heads, PACKED_NAME .. ': num_heads')
  local bias, scale = bias_of(opts, qkv, PACKED_NAME), scale_of(opts, PACKED_NAME)
  local hkv = opts.kv ~= nil and handle(opts.kv, PACKED_NAME) or nil
  return wrap(C.ts_attention_packed(hq, hkv, heads, bias and handle(bias, PACKED_NAME) or nil, scale))
end

-- T.F.relative_position_bias(pos, w1, b1, w2, b2) → [W, H, N, N]: Swin's continuous relative
-- position bias (UM-MAE's posmlp) in one op,
--   Conv1x1(w1, b1) → ReLU → Conv1x1(w2, b2) applied to sign(d) log(1 + |d|),
--   d[w, c, i, j] = pos[w, c, j] - pos[w, c, i],
-- for pos [W, C, N] (C coordinates of N tokens per window), w1 [P, C] or [P, C, 1, 1], w2 [H, P] or
-- [H, P, 1, 1]; b1, b2 may be nil. The [W, P, N, N] hidden layer is never stored (see tessera.h).
local PB_NAME = 'relative_position_bias'
local function optional(t) return t ~= nil and handle(t, PB_NAME) or nil end

function F.relative_position_bias(pos, w1, b1, w2, b2)
  return wrap(C.ts_relative_position_bias(handle(pos, PB_NAME), handle(w1, PB_NAME), optional(b1),
    handle(w2, PB_NAME), optional(b2)))
end

return F
