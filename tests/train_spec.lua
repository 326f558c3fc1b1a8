-- train_spec.lua — proof that networks train: an MLP fits a synthetic problem, saved weights
-- reproduce outputs bit for bit, and a ViT block gives the same outputs and gradients whether a
-- batch runs at once or in two halves with gradient accumulation.
local T = require 'tessera'
local S = require 'support'
local nn = T.nn
local L = require 'tessera.models.layers'

local MLP = nn.Module:extend('MLP')
function MLP:__init(d_in, hidden, d_out)
  self.fc1 = nn.Linear(d_in, hidden)
  self.act = nn.GELU()
  self.fc2 = nn.Linear(hidden, d_out)
end
function MLP:forward(x) return self.fc2(self.act(self.fc1(x))) end

describe('training', function()
  it('fits a 2-layer MLP to a smooth target until the loss is near zero', function()
    T.manual_seed(0)
    local x = T.rand(256, 2) * 2 - 1
    local y = (x:select(1, 0) * 3):sin():mul(x:select(1, 1)):unsqueeze(1) -- y = sin(3 x0) x1
    local model = MLP(2, 64, 1)
    local opt = T.optim.AdamW(model:parameters(), { lr = 1e-2, weight_decay = 0 })
    local first, last
    for step = 1, 800 do
      local loss = T.F.mse_loss(model(x), y)
      opt:zero_grad()
      loss:backward()
      opt:step()
      if step == 1 then first = loss:item() end
      last = loss:item()
    end
    assert.is_true(last < 1e-3, string.format('final loss %.3g (first %.3g)', last, first))
    assert.is_true(last < first / 50)
  end)

  it('reproduces outputs bit for bit from a saved state dict', function()
    T.manual_seed(1)
    local a = MLP(4, 16, 3)
    local path = os.tmpname()
    T.save(path, a)
    T.manual_seed(2)
    local b = MLP(4, 16, 3)
    T.load(path, { into = b })
    os.remove(path)
    local x = T.randn(5, 4)
    assert.is_true(a(x):eq(b(x)):all():item())
  end)

  it('gives a ViT block the same outputs and gradients at once or in two accumulated halves', function()
    T.manual_seed(3)
    local block = L.Block(32, 4, 4, { eps = 1e-6 })
    local x = T.randn(6, 17, 32)
    local w = T.randn(6, 17, 32)
    local function loss_of(xs, ws) return (block(xs) * ws):sum() end

    local full_out = block(x)
    block:zero_grad()
    loss_of(x, w):backward()
    local full = {}
    for name, p in block:named_parameters() do full[name] = p.grad:clone() end

    block:zero_grad()
    local halves = {}
    for i, range in ipairs { { 0, 3 }, { 3, 3 } } do
      local xs, ws = x:narrow(0, range[1], range[2]), w:narrow(0, range[1], range[2])
      halves[i] = block(xs)
      loss_of(xs, ws):backward() -- gradients accumulate in .grad
    end
    S.assert_close(T.cat(halves, 0), full_out, 1e-6, 1e-6, 'outputs')
    for name, p in block:named_parameters() do
      S.assert_close(p.grad, full[name], 1e-5, 1e-5, name)
    end
  end)
end)
