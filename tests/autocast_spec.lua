-- autocast_spec.lua — mixed precision (T.autocast): the thread-local setting nests and is restored
-- on error; on the CPU it changes nothing (outputs and gradients bit-identical); with a GPU
-- (pending otherwise) products run in bfloat16 or float16, norms and losses in float32, casts are
-- recorded so float32 parameters get float32 gradients, close to float32 within 16-bit rounding.
local each = require 'tessera.each'
local T = require 'tessera'
local S = require 'support'
local CS = require 'cuda_support'
local nn, F = T.nn, T.F

-- ||a - b|| / ||b|| in float64 on the host.
local function rel_l2(a, b)
  a, b = a:detach():cpu():double(), b:detach():cpu():double()
  local n = b:norm():item()
  return (a - b):norm():item() / (n > 0 and n or 1)
end

-- Linear → LayerNorm → GELU → Linear → MSE against a fixed target, every layer's output kept.
local function small_net(device)
  T.manual_seed(7)
  local net = { fc1 = nn.Linear(24, 32), norm = nn.LayerNorm(32), fc2 = nn.Linear(32, 8) }
  for _, m in each(net) do m:to(device) end
  return net
end

local function run(net, x, target)
  local out = {}
  out.fc1 = net.fc1(x)
  out.norm = net.norm(out.fc1)
  out.fc2 = net.fc2(F.gelu(out.norm))
  out.loss = F.mse_loss(out.fc2, target)
  return out
end

local function params(net)
  local list = {}
  for _, key in ipairs { 'fc1', 'norm', 'fc2' } do
    for name, p in net[key]:named_parameters() do list[#list + 1] = { key .. '.' .. name, p } end
  end
  return list
end

local function inputs(device)
  local x = S.rand_tensor({ 6, 5, 24 }, 11, 'float32'):to(device)
  local target = S.rand_tensor({ 6, 5, 8 }, 12, 'float32'):to(device)
  return x, target
end

describe('autocast', function()
  after_each(function() T.autocast('float32', function() end) end)

  it('is off by default and reports its dtype inside a region', function()
    assert.equals('float32', T.get_autocast())
    assert.equals('bfloat16', T.autocast('bfloat16', T.get_autocast))
    assert.equals('float16', T.autocast('float16', T.get_autocast))
    assert.equals('float32', T.get_autocast())
  end)

  it('passes arguments and every result through', function()
    local a, b, c = T.autocast('bfloat16', function(x, y) return x + y, nil, 'z' end, 1, 2)
    assert.equals(3, a)
    assert.is_nil(b)
    assert.equals('z', c)
  end)

  it('nests, and a float32 region turns it off inside a bfloat16 one', function()
    local seen = T.autocast('bfloat16', function()
      local inner = T.autocast('float32', T.get_autocast)
      local again = T.autocast('float16', T.get_autocast)
      return { inner, again, T.get_autocast() }
    end)
    assert.same({ 'float32', 'float16', 'bfloat16' }, seen)
    assert.equals('float32', T.get_autocast())
  end)

  it('restores the previous setting when the function raises', function()
    local err = S.assert_error(function()
      T.autocast('bfloat16', function()
        T.autocast('float16', function() error('inner failure', 0) end)
      end)
    end, 'inner failure')
    assert.equals('inner failure', err)
    assert.equals('float32', T.get_autocast())
    T.autocast('bfloat16', function()
      pcall(T.autocast, 'float32', function() error('x') end)
      assert.equals('bfloat16', T.get_autocast())
    end)
  end)

  it('rejects dtypes that are not floating 16/32-bit and bad arguments', function()
    S.assert_error(function() T.autocast('int64', function() end) end,
      "autocast: expected 'bfloat16', 'float16' or 'float32' (off), got 'int64'")
    S.assert_error(function() T.autocast('float64', function() end) end, "got 'float64'")
    S.assert_error(function() T.autocast('nonsense', function() end) end, 'autocast: unknown dtype nonsense')
    S.assert_error(function() T.autocast('bfloat16', 42) end, 'autocast: expected a function to run, got number')
    S.assert_error(function() T.autocast(nil, function() end) end, 'autocast: expected a dtype')
    assert.equals('float32', T.get_autocast())
  end)

  it('is the C setting: ts_set_autocast returns the previous one and refuses other dtypes', function()
    local C = require('tessera.core').C
    assert.equals(-1, C.ts_set_autocast(C.TS_BF16))
    assert.equals(C.TS_BF16, C.ts_get_autocast())
    assert.equals(C.TS_BF16, C.ts_set_autocast(C.TS_F32)) -- float32 means off
    assert.equals(-1, C.ts_get_autocast())
    assert.equals(-2, C.ts_set_autocast(C.TS_I64))
    assert.equals(-1, C.ts_get_autocast())
    C.ts_clear_error()
  end)

  it('changes nothing on the cpu: outputs and gradients are bit-identical', function()
    local x, target = inputs('cpu')
    local ref_net, amp_net = small_net('cpu'), small_net('cpu')
    local ref = run(ref_net, x, target)
    local amp = T.autocast('bfloat16', run, amp_net, x, target)
    for _, key in ipairs { 'fc1', 'norm', 'fc2', 'loss' } do
      assert.equals('float32', amp[key].dtype, key)
      assert.is_true(amp[key]:eq(ref[key]):all():item(), key .. ' differs under autocast on the cpu')
    end
    ref.loss:backward()
    amp.loss:backward()
    local a, r = params(amp_net), params(ref_net)
    for i = 1, #a do
      assert.is_true(a[i][2].grad:eq(r[i][2].grad):all():item(), a[i][1] .. ': gradient differs')
    end
    -- products and attention too
    local q = S.rand_tensor({ 2, 3, 9, 8 }, 13, 'float32')
    local attn = T.autocast('bfloat16', F.scaled_dot_product_attention, q, q, q)
    assert.is_true(attn:eq(F.scaled_dot_product_attention(q, q, q)):all():item())
    assert.equals('float32', T.autocast('bfloat16', T.matmul, q, q:transpose(-1, -2)).dtype)
  end)

  -- ---- on a GPU -----------------------------------------------------------------------------------
  for _, half in ipairs { 'bfloat16', 'float16' } do
    CS.it('runs products in ' .. half .. ' and norms and losses in float32, with float32 gradients', function()
      local x, target = inputs('cuda')
      local ref_net, amp_net = small_net('cuda'), small_net('cuda')
      local ref = run(ref_net, x, target)
      local amp = T.autocast(half, run, amp_net, x, target)
      assert.equals(half, amp.fc1.dtype, 'linear output')
      assert.equals('float32', amp.norm.dtype, 'layer_norm output')
      assert.equals(half, amp.fc2.dtype, 'linear output')
      assert.equals('float32', amp.loss.dtype, 'mse_loss output')
      for _, key in ipairs { 'fc1', 'norm', 'fc2' } do
        local err = rel_l2(amp[key], ref[key])
        assert.is_true(err < 2e-2, string.format('%s: relative error %.3g against float32', key, err))
      end
      assert.is_true(rel_l2(amp.loss, ref.loss) < 2e-2, 'loss')
      -- backward outside the region: the tape remembers the casts
      ref.loss:backward()
      amp.loss:backward()
      local a, r = params(amp_net), params(ref_net)
      for i = 1, #a do
        local p, g = a[i][2], a[i][2].grad
        assert.equals('float32', p.dtype, a[i][1])
        assert.is_not_nil(g, a[i][1] .. ' got no gradient')
        assert.equals('float32', g.dtype, a[i][1] .. ' gradient dtype')
        local err = rel_l2(g, r[i][2].grad)
        assert.is_true(err < 5e-2, string.format('%s: gradient relative error %.3g against float32', a[i][1], err))
      end
      local gx = x:clone():requires_grad_()
      T.autocast(half, run, amp_net, gx, target).loss:backward()
      assert.equals('float32', gx.grad.dtype, 'input gradient dtype')
    end)

    CS.it(half .. ' covers matmul, bmm, conv2d and attention, and leaves float64 and the cpu alone', function()
      local a = S.rand_tensor({ 4, 16, 32 }, 21, 'float32'):cuda()
      local b = S.rand_tensor({ 4, 32, 8 }, 22, 'float32'):cuda()
      local mm = T.autocast(half, T.matmul, a, b)
      assert.equals(half, mm.dtype)
      assert.is_true(rel_l2(mm, T.matmul(a, b)) < 1e-2)
      assert.equals(half, T.autocast(half, T.bmm, a, b).dtype)
      assert.equals('float64', T.autocast(half, T.matmul, a:double(), b:double()).dtype)
      local img = S.rand_tensor({ 2, 3, 16, 16 }, 23, 'float32'):cuda()
      local w, bias = S.rand_tensor({ 8, 3, 4, 4 }, 24, 'float32'):cuda(), S.rand_tensor({ 8 }, 25, 'float32'):cuda()
      local conv = T.autocast(half, F.conv2d, img, w, bias, { stride = 4 })
      assert.equals(half, conv.dtype)
      assert.is_true(rel_l2(conv, F.conv2d(img, w, bias, { stride = 4 })) < 2e-2)
      local q = S.rand_tensor({ 2, 3, 49, 32 }, 26, 'float32'):cuda()
      local rel = S.rand_tensor({ 3, 49, 49 }, 27, 'float32'):cuda()
      local o = T.autocast(half, F.scaled_dot_product_attention, q, q, q, { bias = rel })
      assert.equals(half, o.dtype)
      assert.is_true(rel_l2(o, F.scaled_dot_product_attention(q, q, q, { bias = rel })) < 2e-2)
      -- softmax and cross entropy of a 16-bit tensor run in float32
      local logits = mm:view(-1, 8)
      assert.equals('float32', T.autocast(half, F.softmax, logits, -1).dtype)
      local labels = T.arange(0, logits:size(0), { dtype = 'int64' }):remainder(8):cuda()
      assert.equals('float32', T.autocast(half, F.cross_entropy, logits, labels).dtype)
      -- the same calls on the cpu are untouched
      assert.equals('float32', T.autocast(half, T.matmul, a:cpu(), b:cpu()).dtype)
    end)
  end

  CS.it('keeps layer norm statistics and the attention log-sum-exp in float32 for bfloat16 inputs', function()
    -- rows around 1024 with a spread near 37: their mean rounded to bfloat16 (steps of 8 there) would
    -- shift every normalized value by up to a tenth of a standard deviation
    local x = (S.rand_tensor({ 64, 256 }, 31, 'float32') * 64 + 1024):bfloat16()
    local want = F.layer_norm(x:float(), { 256 }):bfloat16()
    local got = F.layer_norm(x:cuda(), { 256 })
    assert.equals('bfloat16', got.dtype)
    assert.is_true(rel_l2(got, want) < 1e-2, 'layer_norm of offset bfloat16 rows')
    local coef = S.rand_tensor({ 64, 256 }, 35, 'float32')
    local gx = x:cuda():requires_grad_()
    ;(F.layer_norm(gx, { 256 }):float() * coef:cuda()):sum():backward()
    local cx = x:float():requires_grad_()
    ;(F.layer_norm(cx, { 256 }) * coef):sum():backward()
    assert.is_true(rel_l2(gx.grad, cx.grad) < 2e-2, 'layer_norm gradient of offset bfloat16 rows')
    -- scores around 100: a log-sum-exp rounded to 16 bits (steps of 0.5) would put the recomputed
    -- probabilities of the backward up to 25% off
    local q = (S.rand_tensor({ 2, 3, 49, 32 }, 32, 'float32') * 0.2 + 1.8):bfloat16()
    local k = (S.rand_tensor({ 2, 3, 49, 32 }, 33, 'float32') * 0.2 + 1.8):bfloat16()
    local v = S.rand_tensor({ 2, 3, 49, 32 }, 34, 'float32'):bfloat16()
    local function grads(device)
      local qq, kk, vv = q:to(device):requires_grad_(), k:to(device):requires_grad_(), v:to(device):requires_grad_()
      local o = F.scaled_dot_product_attention(qq, kk, vv, { scale = 1 })
      o:float():pow(2):sum():backward()
      return o, qq.grad, kk.grad, vv.grad
    end
    local gpu, cpu = { grads('cuda') }, { grads('cpu') }
    for i, what in ipairs { 'output', 'dq', 'dk', 'dv' } do
      local err = rel_l2(gpu[i], cpu[i])
      assert.is_true(err < 5e-2, string.format('attention %s with scores near 100: relative error %.3g', what, err))
    end
  end)
end)
