-- tessera.nn.weight_init — T.nn.init: in-place initializers with torch.nn.init's semantics.
-- Each writes under no_grad (parameters are leaves) and returns the tensor.
local T = require 'tessera.core'.T

local init = {}

local function no_grad(fn) return T.no_grad(fn) end

-- fan_in / fan_out as torch.nn.init._calculate_fan_in_and_fan_out: dim 1 is inputs, dim 0
-- outputs, and any further dims are the receptive field.
function init.calculate_fan_in_and_fan_out(t)
  local dims = t:dim()
  if dims < 2 then
    error('init: fan in and fan out need a tensor with at least 2 dims, got ' .. dims, 2)
  end
  local receptive = 1
  for d = 2, dims - 1 do receptive = receptive * t:size(d) end
  return t:size(1) * receptive, t:size(0) * receptive
end

local gains = {
  linear = function() return 1 end, conv2d = function() return 1 end, sigmoid = function() return 1 end,
  tanh = function() return 5 / 3 end, relu = function() return math.sqrt(2) end,
  leaky_relu = function(a) a = a or 0.01; return math.sqrt(2 / (1 + a * a)) end,
  selu = function() return 3 / 4 end,
}

function init.calculate_gain(nonlinearity, param)
  local g = gains[nonlinearity]
  if not g then error('calculate_gain: unsupported nonlinearity ' .. tostring(nonlinearity), 2) end
  return g(param)
end

function init.uniform_(t, a, b, generator)
  return no_grad(function() return t:uniform_(a or 0, b or 1, generator) end)
end

function init.normal_(t, mean, std, generator)
  return no_grad(function() return t:normal_(mean or 0, std or 1, generator) end)
end

function init.constant_(t, v) return no_grad(function() return t:fill_(v) end) end
function init.zeros_(t) return init.constant_(t, 0) end
function init.ones_(t) return init.constant_(t, 1) end

function init.xavier_uniform_(t, gain, generator)
  local fan_in, fan_out = init.calculate_fan_in_and_fan_out(t)
  local a = (gain or 1) * math.sqrt(6 / (fan_in + fan_out))
  return init.uniform_(t, -a, a, generator)
end

function init.xavier_normal_(t, gain, generator)
  local fan_in, fan_out = init.calculate_fan_in_and_fan_out(t)
  return init.normal_(t, 0, (gain or 1) * math.sqrt(2 / (fan_in + fan_out)), generator)
end

local function kaiming_std(t, a, mode, nonlinearity)
  local fan_in, fan_out = init.calculate_fan_in_and_fan_out(t)
  mode = mode or 'fan_in'
  if mode ~= 'fan_in' and mode ~= 'fan_out' then
    error("kaiming init: mode must be 'fan_in' or 'fan_out', got " .. tostring(mode), 3)
  end
  local gain = init.calculate_gain(nonlinearity or 'leaky_relu', a or 0)
  return gain / math.sqrt(mode == 'fan_in' and fan_in or fan_out)
end

-- Defaults as PyTorch: a = 0, mode = 'fan_in', nonlinearity = 'leaky_relu'.
function init.kaiming_uniform_(t, a, mode, nonlinearity, generator)
  local bound = math.sqrt(3) * kaiming_std(t, a, mode, nonlinearity)
  return init.uniform_(t, -bound, bound, generator)
end

function init.kaiming_normal_(t, a, mode, nonlinearity, generator)
  return init.normal_(t, 0, kaiming_std(t, a, mode, nonlinearity), generator)
end

-- Normal(mean, std) truncated to [a, b] (absolute bounds, as timm's and torch's trunc_normal_).
-- Out-of-range draws are redrawn until none is left: exact, and a handful of passes even for
-- the usual ±2 std bounds.
function init.trunc_normal_(t, mean, std, a, b, generator)
  mean, std, a, b = mean or 0, std or 1, a or -2, b or 2
  if not (a < b) then error(string.format('trunc_normal_: need a < b, got [%g, %g]', a, b), 2) end
  return no_grad(function()
    local x = t:clone():normal_(mean, std, generator)
    for _ = 1, 1000 do
      local bad = x:lt(a):logical_or(x:gt(b))
      if not bad:any():item() then
        t:copy_(x)
        return t
      end
      x = T.where(bad, x:clone():normal_(mean, std, generator), x)
    end
    error(string.format('trunc_normal_: [%g, %g] is too narrow for N(%g, %g^2)', a, b, mean, std), 0)
  end)
end

return init
