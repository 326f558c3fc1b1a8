-- models_spec.lua — the model zoo beyond parity: construction from factories and official
-- constructor names, the official initialization, the decoder position option, classifiers,
-- and clear errors for impossible configurations.
local each = require 'tessera.each'
local T = require 'tessera'
local S = require 'support'
local L = require 'tessera.models.layers'
local D = require 'tessera.models.um_decoder'

local function micro_swin(extra)
  local kw = { img_size = 64, patch_size = 2, stride = 8, embed_dim = 8, depths = { 1, 1, 1, 1 },
    num_heads = { 1, 1, 2, 2 }, window_size = 4, posmlp_dim = 8, decoder_embed_dim = 16, decoder_depth = 1,
    decoder_num_heads = 2, norm_layer = { type = 'LayerNorm', eps = 1e-6 }, norm_pix_loss = true, vis_mask_ratio = 0.25 }
  for k, v in each(extra or {}) do kw[k] = v end
  return T.models.MaskedAutoencoderSwin(kw)
end

describe('model zoo', function()
  it('lists the official factories and builds them by name', function()
    local names = table.concat(T.models.names(), ' ')
    for _, n in ipairs { 'mae_swin_tiny_256', 'mae_swin_large_256', 'mae_pvt_small_256', 'mae_vit_base_patch16',
      'mae_vit_base_patch16_dec512d2b', 'simmim_swin_tiny_256', 'simmim_pvt_small_256', 'swin_tiny_256',
      'pvt_small_256', 'vit_base_patch16' } do
      assert.truthy(names:find(n, 1, true), n)
    end
    S.assert_error(function() T.models.create('resnet50') end, 'unknown model resnet50', 'mae_swin_tiny_256')
    S.assert_error(function() T.models.MaskedAutoencoderSwin{ embed_dims = 3 } end,
      "MaskedAutoencoderSwin: unknown option 'embed_dims'", 'embed_dim')
  end)

  it('factories keep the official settings the recipes rely on (small overrides, no full-size build)', function()
    local vit = { img_size = 32, embed_dim = 8, depth = 1, num_heads = 1, decoder_embed_dim = 8, decoder_num_heads = 1 }
    assert.equal(2, T.models.create('mae_vit_base_patch16_dec512d2b', vit).config.decoder_depth)
    assert.equal(8, T.models.create('mae_vit_base_patch16', vit).config.decoder_depth)
    local swin = { img_size = 64, embed_dim = 8, depths = { 1, 1, 1, 1 }, num_heads = { 1, 1, 1, 1 } }
    assert.equal(16, T.models.create('simmim_swin_tiny_256', swin).config.window_size)
  end)

  it('initializes as the official code: fixed sin-cos positions, N(0, 0.02) tokens, xavier linears', function()
    T.manual_seed(0)
    local m = micro_swin()
    S.assert_close(m.decoder_pos_embed, L.sincos_pos_embed(16, 8, false), 0, 0)
    assert.is_false(m.decoder_pos_embed.requires_grad)
    local qkv = m.blocks[0].attn.qkv
    local bound = math.sqrt(6 / (qkv.in_features + qkv.out_features))
    assert.is_true(qkv.weight:abs():amax():item() <= bound + 1e-7)
    assert.equal(0, qkv.bias:abs():amax():item())
    assert.equal(1, m.norm.weight:mean():item())
  end)

  it('sin-cos tables put the column in the first half and the row in the second', function()
    local pe = L.sincos_pos_embed(8, 3, true)
    assert.same({ 1, 10, 8 }, pe:size())
    assert.equal(0, pe[0][0]:abs():sum():item())            -- the cls row is zero
    local p = pe[0][1 + 1 * 3 + 2]                          -- row 1, column 2
    S.assert_close(p:narrow(0, 0, 2), { math.sin(2), math.sin(2 * 10000 ^ -0.5) }, 1e-6)
    S.assert_close(p:narrow(0, 4, 2), { math.sin(1), math.sin(10000 ^ -0.5) }, 1e-6)
  end)

  it("gives visible tokens their own patch's position with decoder_pos = 'corrected'", function()
    T.manual_seed(1)
    local mask = T.masks.uniform(2, 8, 8).mask
    local model = micro_swin{ decoder_pos = 'corrected' }
    local N, Lp, dim = 2, 64, 16
    local pos_table = model.decoder_pos_embed:expand(N, Lp, dim)
    local got = D.visible_positions(model, pos_table, mask, nil)
    local m = mask:to('int64'):totable()
    for n = 1, N do
      for gy = 0, 3 do for gx = 0, 3 do
        local kept
        for dy = 0, 1 do for dx = 0, 1 do
          local p = (2 * gy + dy) * 8 + 2 * gx + dx
          if m[n][p + 1] == 0 then kept = p end
        end end
        S.assert_close(got[n - 1][gy * 4 + gx], model.decoder_pos_embed[0][kept], 0, 0)
      end end
    end
    -- the official order differs on this mask (the quirk), and so do the predictions
    local official = micro_swin{ decoder_pos = 'official' }
    official:load_state_dict(model:state_dict())
    local latent = T.randn(2, 4, 64)
    local a, b = D.forward_decoder(model, latent, mask), D.forward_decoder(official, latent, mask)
    assert.same({ 2, 64, 192 }, a:size())
    assert.is_false(a:eq(b):all():item())
    S.assert_error(function() micro_swin{ decoder_pos = 'sideways' } end, 'decoder_pos')
  end)

  it('refuses encoder/decoder geometries that cannot meet', function()
    S.assert_error(function() micro_swin{ depths = { 1, 1, 1 }, num_heads = { 1, 1, 2 } } end, '3 stages', 'decoder needs')
    S.assert_error(function() micro_swin{ img_size = 100 } end,
      'MaskedAutoencoderSwin: img_size 100 is not a multiple of stride 8')
    S.assert_error(function() T.models.VisionTransformer{ img_size = 30, patch_size = 8 } end,
      'VisionTransformer: img_size 30 is not a multiple of patch_size 8')
  end)

  it('classifies with the fine-tuning models', function()
    T.manual_seed(2)
    local swin = T.models.Swin{ img_size = 32, num_classes = 7, patch_size = 2, embed_dim = 8, depths = { 1, 1 },
      num_heads = { 1, 2 }, window_size = 4, posmlp_dim = 8, drop_path_rate = 0.1 }
    assert.same({ 3, 7 }, swin(T.randn(3, 3, 32, 32)):size())
    local pvt = T.models.PVT{ img_size = 32, num_classes = 5, embed_dims = { 8, 16 }, depths = { 1, 1 }, num_heads = { 1, 2 },
      mlp_ratios = { 2, 2 }, sr_ratios = { 2, 1 } }
    assert.same({ 2, 5 }, pvt(T.randn(2, 3, 32, 32)):size())
    local vit = T.models.VisionTransformer{ img_size = 32, patch_size = 8, num_classes = 4, embed_dim = 16, depth = 2,
      num_heads = 2 }
    assert.same({ 2, 4 }, vit(T.randn(2, 3, 32, 32)):size())
    assert.truthy(vit:no_weight_decay().pos_embed)
  end)
end)
