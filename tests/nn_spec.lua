-- nn_spec.lua — the Module system: registration and PyTorch names, modes, state dicts,
-- conversions, printing, initializers; and a small network that trains.
local each = require 'tessera.each'
local T = require 'tessera'
local S = require 'support'
local nn = T.nn

local Attn = nn.Module:extend('Attn')
function Attn:__init(dim)
  self.qkv = nn.Linear(dim, dim * 3)
  self.proj = nn.Linear(dim, dim)
end
function Attn:forward(x) return self.proj(self.qkv(x):narrow(-1, 0, x:size(-1))) end

local Block = nn.Module:extend('Block')
function Block:__init(dim)
  self.norm1 = nn.LayerNorm(dim)
  self.attn = Attn(dim)
  self.gamma = nn.Parameter(T.ones(dim))
end
function Block:forward(x) return x + self.attn(self.norm1(x)) * self.gamma end

local Net = nn.Module:extend('Net')
function Net:__init(dim, depth)
  self.pos_embed = nn.Parameter(T.zeros(1, 4, dim), false) -- frozen, as MAE's fixed sin-cos table
  self.blocks = nn.ModuleList{}
  for _ = 1, depth do self.blocks:append(Block(dim)) end
  self.norm = nn.LayerNorm(dim)
  self.bn = nn.BatchNorm2d(2)
end
function Net:forward(x)
  x = x + self.pos_embed
  for _, blk in self.blocks:iter() do x = blk(x) end
  return self.norm(x)
end

describe('Module registration', function()
  it('names parameters like PyTorch, in registration order', function()
    local net = Net(8, 2)
    local names = {}
    for name in net:named_parameters() do names[#names + 1] = name end
    assert.same({ 'pos_embed',
      'blocks.0.gamma', 'blocks.0.norm1.weight', 'blocks.0.norm1.bias', 'blocks.0.attn.qkv.weight',
      'blocks.0.attn.qkv.bias', 'blocks.0.attn.proj.weight', 'blocks.0.attn.proj.bias',
      'blocks.1.gamma', 'blocks.1.norm1.weight', 'blocks.1.norm1.bias', 'blocks.1.attn.qkv.weight',
      'blocks.1.attn.qkv.bias', 'blocks.1.attn.proj.weight', 'blocks.1.attn.proj.bias',
      'norm.weight', 'norm.bias', 'bn.weight', 'bn.bias' }, names)
    local buffers = {}
    for name in net:named_buffers() do buffers[#buffers + 1] = name end
    assert.same({ 'bn.running_mean', 'bn.running_var', 'bn.num_batches_tracked' }, buffers)
  end)

  it('keeps frozen parameters out of the trainable count', function()
    local net = Net(8, 1)
    assert.is_false(net.pos_embed.requires_grad)
    assert.is_true(net.blocks[0].attn.qkv.weight.requires_grad)
    local frozen = 32
    assert.equal(net:num_parameters() - frozen, net:num_parameters(true))
  end)

  it('indexes ModuleList from 0 and refuses bad indices', function()
    local net = Net(4, 3)
    assert.equal(3, net.blocks:len())
    assert.equal(net.blocks[2], net.blocks[-1])
    S.assert_error(function() return net.blocks[3] end, 'index 3 out of range', '3 modules')
  end)

  it('propagates train/eval and applies functions children first', function()
    local net = Net(4, 2)
    net:eval()
    assert.is_false(net.blocks[1].attn.training)
    net:train()
    assert.is_true(net.norm.training)
    local order = {}
    net.blocks[0]:apply(function(m) order[#order + 1] = m.__name end)
    assert.same({ 'LayerNorm', 'Linear', 'Linear', 'Attn', 'Block' }, order)
  end)

  it('rejects bad names, values and options with messages', function()
    local m = nn.Module:extend('M')()
    S.assert_error(function() m:register_parameter('a.b', T.zeros(1)) end, 'invalid name')
    S.assert_error(function() nn.Parameter(3) end, 'expected a tensor')
    S.assert_error(function() nn.Linear(2, 3, { bais = false }) end, "Linear: unknown option 'bais'", 'bias')
    S.assert_error(function() nn.Conv2d(3, 4, 3, { groups = 2 }) end, 'divisible by groups')
  end)
end)

describe('state dicts', function()
  it('round-trips every parameter and persistent buffer bit-exactly', function()
    T.manual_seed(1)
    local a = Net(8, 2)
    T.manual_seed(2)
    local b = Net(8, 2)
    assert.is_false(a.blocks[0].attn.qkv.weight:eq(b.blocks[0].attn.qkv.weight):all():item())
    local report = b:load_state_dict(a:state_dict())
    assert.same({}, report.missing_keys)
    for name, t in each(a:state_dict()) do
      assert.is_true(t:eq(b:state_dict()[name]):all():item(), name)
    end
    assert.equal(#b:state_dict_keys(), 22)
    assert.equal('bn.num_batches_tracked', b:state_dict_keys()[22])
  end)

  it('reports missing, unexpected and mismatched keys, strictly or not', function()
    local net = Net(8, 1)
    local sd = net:state_dict()
    sd['norm.weight'] = nil
    sd['head.weight'] = T.zeros(3)
    sd['norm.bias'] = T.zeros(9)
    local err = S.assert_error(function() net:load_state_dict(sd) end, 'missing keys: norm.weight',
      'unexpected keys: head.weight', 'norm.bias (checkpoint [9], model [8])')
    assert.truthy(err:find('Net', 1, true))
    -- a shape mismatch is an error even when not strict (as PyTorch); missing and unexpected are not
    S.assert_error(function() net:load_state_dict(sd, { strict = false }) end, 'norm.bias (checkpoint [9], model [8])')
    sd['norm.bias'] = nil
    local report = net:load_state_dict(sd, { strict = false })
    assert.same({ 'norm.bias', 'norm.weight' }, report.missing_keys)
    assert.same({ 'head.weight' }, report.unexpected_keys)
  end)

  it('excludes non-persistent buffers', function()
    local m = nn.Module:extend('M')()
    m.keep = nn.Buffer(T.zeros(2))
    m.scratch = nn.Buffer(T.zeros(2), false)
    local sd = m:state_dict()
    assert.truthy(sd.keep); assert.falsy(sd.scratch)
  end)
end)

describe('conversions and printing', function()
  it('to(dtype) converts floating parameters and buffers, keeping leaves and integer buffers', function()
    local net = Net(4, 1):to('float64')
    assert.equal('float64', net.norm.weight.dtype)
    assert.is_true(net.norm.weight.requires_grad and net.norm.weight.is_leaf)
    assert.is_false(net.pos_embed.requires_grad)
    assert.equal('int64', net.bn.num_batches_tracked.dtype)
  end)

  it('prints a readable tree', function()
    local s = tostring(Net(4, 1))
    assert.truthy(s:find('(blocks): ModuleList(', 1, true))
    assert.truthy(s:find('(qkv): Linear(in_features=4, out_features=12, bias=true)', 1, true))
    assert.truthy(s:find('(bn): BatchNorm2d(2, eps=1e-05, momentum=0.1, affine=true)', 1, true))
  end)
end)

describe('initializers', function()
  it('match torch.nn.init bounds and spreads', function()
    T.manual_seed(3)
    local w = T.empty(256, 128)
    nn.init.xavier_uniform_(w)
    local a = math.sqrt(6 / (256 + 128))
    assert.is_true(w:amax():item() <= a and w:amin():item() >= -a)
    nn.init.kaiming_normal_(w, 0, 'fan_in', 'relu')
    S.assert_close(w:std():item(), math.sqrt(2 / 128), 0.03)
    nn.init.trunc_normal_(w, 0, 0.02)
    assert.is_true(w:abs():amax():item() <= 2) -- timm's bounds are absolute
    S.assert_close(w:std():item(), 0.02, 0.03)
    nn.init.trunc_normal_(w, 0, 1, -1, 1)
    assert.is_true(w:amax():item() <= 1 and w:amin():item() >= -1)
    S.assert_close(w:std():item(), 0.5379, 0.03) -- std of N(0,1) truncated to [-1, 1]
    nn.init.constant_(w, 0.5)
    assert.equal(0.5, w:mean():item())
  end)

  it('gives Linear and Conv2d PyTorch default initialization', function()
    T.manual_seed(4)
    local lin = nn.Linear(100, 50)
    local bound = 1 / math.sqrt(100)
    assert.is_true(lin.weight:abs():amax():item() <= bound + 1e-7)
    assert.is_true(lin.bias:abs():amax():item() <= bound + 1e-7)
    local conv = nn.Conv2d(4, 8, 3)
    assert.same({ 8, 4, 3, 3 }, conv.weight:size())
    assert.is_true(conv.weight:abs():amax():item() <= 1 / math.sqrt(36) + 1e-7)
  end)
end)

describe('Module edge cases', function()
  it('refuses a name already used by another kind, and plain tensors over parameters', function()
    local m = nn.Module:extend('M')()
    m.x = nn.Buffer(T.zeros(2))
    S.assert_error(function() m.x = nn.Parameter(T.ones(3)) end, "'x' is already a buffer of M")
    m.w = nn.Parameter(T.ones(2))
    S.assert_error(function() m.w = nn.Identity() end, "'w' is already a parameter of M")
    S.assert_error(function() m.w = T.zeros(2) end, "plain tensor to parameter 'w'", 'nn.Parameter')
    m.w = nil -- clears it, as PyTorch
    assert.is_nil(m.w)
    m.w = nn.Parameter(T.ones(2))
    assert.same({ 'w' }, (function() local n = {} for k in m:named_parameters() do n[#n + 1] = k end return n end)())
  end)

  it('lists tied parameters once and keeps them tied through to()', function()
    local a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    b.weight = nn.Parameter(a.weight)
    local s = nn.Sequential(a, b)
    assert.equal(3, #s:parameters()) -- a.weight (= b.weight), a.bias, b.bias
    T.optim.AdamW(s:parameters()) -- no duplicate-parameter error
    a.weight.grad = T.ones(2, 2)
    s:to('float64')
    assert.equal('float64', a.weight.dtype)
    assert.is_true(a.weight:shares_storage(b.weight))
    assert.equal('float64', a.weight.grad.dtype)
  end)
end)
