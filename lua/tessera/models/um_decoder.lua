-- tessera.models.um_decoder — what UM-MAE's Swin and PVT pre-training models share after the
-- encoder: secondary masking, the light ViT decoder (Linear to 4*D, PixelShuffle(2), mask tokens,
-- fixed sin-cos positions), and the losses. SimMIM's prediction head lives here too.
local T = require 'tessera.core'.T
local nn = T.nn
local L = require 'tessera.models.layers'

local D = {}

-- Registers the decoder under the official names on `model`.
function D.build(model, a, enc_dim, eps, mlp_ratio)
  local dim = a.decoder_embed_dim
  local grid = a.img_size / a.stride
  -- PixelShuffle(2) must turn the encoder's last grid into one token per 2x2 group of patches:
  -- the compact input (half the token grid) is halved at every stage after the first
  local stages = #(a.depths)
  local latent = a.img_size / a.patch_size / 2 / 2 ^ (stages - 1)
  if latent * 2 ~= grid / 2 or latent ~= math.floor(latent) then
    error(string.format('%s: with %d stages the encoder ends on a %gx%g grid, but the decoder needs %gx%g '
      .. '(half the %gx%g grid of 2x2 patch groups); the official models use 4 stages with patch_size * 8 = 2 * stride',
      model.__name, stages, latent, latent, grid / 4, grid / 4, grid / 2, grid / 2), 3)
  end
  model.decoder_embed = nn.Linear(enc_dim, 4 * dim)
  model.mask_token = nn.Parameter(T.zeros(1, 1, dim))
  model.decoder_pos_embed = nn.Parameter(T.zeros(1, grid * grid, dim), false)
  model.decoder_blocks = nn.ModuleList{}
  for _ = 1, a.decoder_depth do
    model.decoder_blocks:append(L.Block(dim, a.decoder_num_heads, mlp_ratio or a.mlp_ratio, { eps = eps }))
  end
  model.decoder_norm = nn.LayerNorm(dim, { eps = eps })
  model.decoder_pred = nn.Linear(dim, a.stride * a.stride * a.in_chans)
  if a.decoder_pos ~= 'official' and a.decoder_pos ~= 'corrected' then
    error("decoder_pos must be 'official' (parity with the reference) or 'corrected', got " .. tostring(a.decoder_pos), 3)
  end
end

-- Fixed positions and N(0, 0.02) tokens, as initialize_weights.
function D.init_tokens(model)
  local grid = model.config.img_size / model.config.stride
  T.no_grad(function()
    model.decoder_pos_embed:copy_(L.sincos_pos_embed(model.config.decoder_embed_dim, grid, false))
  end)
  nn.init.normal_(model.mask_token, 0, 0.02)
  if model.vis_mask_token then nn.init.normal_(model.vis_mask_token, 0, 0.02) end
end

-- The mask after secondary masking (1 = removed or replaced by vis_mask_token): given in
-- opts.new_mask, made from opts.noise, or drawn from opts.generator / the default generator.
function D.secondary_mask(model, mask, opts)
  if not model.vis_mask_token then return mask end
  if opts.new_mask then return opts.new_mask end
  return T.masks.secondary(mask, { ratio = model.config.vis_mask_ratio, noise = opts.noise, formula = 'swin',
    generator = opts.generator }).new_mask
end

-- Position rows for the visible tokens, which arrive in 2x2-group order. The official code takes
-- the visible patches' positions in raster order instead (the "decoder position quirk", kept by
-- default for parity); 'corrected' gives each token its own patch's position.
function D.visible_positions(model, pos_table, mask, pos_raster_visible)
  if model.config.decoder_pos == 'official' then return pos_raster_visible end
  local N, Lp = mask:size(0), mask:size(1)
  local Mp = math.floor(math.sqrt(Lp) + 0.5)
  local Mg = Mp / 2
  local in_group = mask:view(N, Mg, 2, Mg, 2):permute(0, 1, 3, 2, 4):reshape(N, Mg * Mg, 4)
  local k = in_group:eq(0):to('int64'):argmax(-1)                     -- which of the 4 is kept
  -- on k's device: the mask may have been moved to the model's device (take_rows accepts either)
  local gy = T.arange(Mg, { device = k.device }):view(Mg, 1):expand(Mg, Mg):reshape(-1)
  local gx = T.arange(Mg, { device = k.device }):view(1, Mg):expand(Mg, Mg):reshape(-1)
  local base = (gy * 2 * Mp + gx * 2):view(1, -1)
  local patch = base + k:floor_divide(2) * Mp + k:remainder(2)
  return L.take_rows(pos_table, patch)
end

-- latent [N, Lc, C] → predictions [N, L, stride^2 * 3]: the visible tokens (group order), then
-- the removed patches (raster order). Also returns the removed patches' indices [N, R], raster order.
function D.forward_decoder(model, latent, mask)
  local x_vis = D.shuffle_predictions(model.decoder_embed(latent))
  local N, dim = x_vis:size(0), x_vis:size(2)
  local order, V = L.visible_first(mask)
  local Lp = mask:size(1)
  local pos_table = model.decoder_pos_embed:expand(N, Lp, dim)
  local pos = L.take_rows(pos_table, order)
  local pos_vis = D.visible_positions(model, pos_table, mask, pos:narrow(1, 0, V))
  local x = T.cat({ x_vis + pos_vis, model.mask_token + pos:narrow(1, V, Lp - V) }, 1)
  for _, blk in model.decoder_blocks:iter() do x = blk(x) end
  return model.decoder_pred(model.decoder_norm(x)), order:narrow(1, V, Lp - V)
end

-- Targets of the removed patches (indices [N, R]), normalized per patch when norm_pix_loss.
function D.removed_targets(model, imgs, removed)
  local target = L.take_rows(L.patchify(imgs, model.config.stride), removed)
  if model.config.norm_pix_loss then target = L.normalize_patches(target) end
  return target
end

-- MSE over the removed patches only (secondary-masked ones are not in the loss); pred ends with them.
function D.loss(model, imgs, pred, removed)
  local R = removed:size(1)
  return T.F.mse_loss(pred:narrow(1, pred:size(1) - R, R), D.removed_targets(model, imgs, removed))
end

-- PixelShuffle(2) of tokens [N, Lf, 4 * C] on their M x M grid → [N, 4 * Lf, C], raster order: the
-- UM-MAE decoder's way back to one token per kept patch, and SimMIM's head.
function D.shuffle_predictions(pred)
  local N, Lf, C4 = pred:size(0), pred:size(1), pred:size(2)
  local m = math.floor(math.sqrt(Lf) + 0.5)
  return T.F.pixel_shuffle(pred:permute(0, 2, 1):reshape(N, C4, m, m), 2):flatten(2):permute(0, 2, 1)
end

-- SimMIM's loss: L1 on raw pixels of the removed patches; also returns their indices [N, R].
function D.simmim_loss(model, imgs, pred, mask)
  local order, V = L.visible_first(mask)
  local removed = order:narrow(1, V, mask:size(1) - V)
  return T.F.l1_loss(L.take_rows(pred, removed), D.removed_targets(model, imgs, removed)), removed
end

return D
