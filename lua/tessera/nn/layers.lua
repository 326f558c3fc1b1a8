-- tessera.nn.layers — the standard layers. Parameter names, shapes, defaults and default
-- initialization are PyTorch's, so state dicts move between the two.
local each = require 'tessera.each'
local core = require 'tessera.core'
local T = core.T

return function(nn)
  local Module, Parameter, Buffer, init = nn.Module, nn.Parameter, nn.Buffer, nn.init

  -- The options merged over their defaults (the keys of `defaults` are the valid ones). A default
  -- of nn.NONE is a valid key whose default is nil.
  local NONE = {}
  nn.NONE = NONE
  local function options(layer, opts, defaults)
    opts = core.options(layer, opts, defaults)
    local out = {}
    for k, v in each(defaults) do
      if v ~= NONE then out[k] = v end
    end
    for k, v in each(opts) do out[k] = v end
    return out
  end
  nn.options = options

  local function pair(v) return type(v) == 'table' and v or { v, v } end

  local function factory_opts(o) return { dtype = o.dtype, device = o.device } end

  -- ---- Linear ------------------------------------------------------------------------------------
  local Linear = Module:extend('Linear')
  nn.Linear = Linear

  function Linear:__init(in_features, out_features, opts)
    local o = options('Linear', opts, { bias = true, dtype = NONE, device = NONE })
    core.int(in_features, 'Linear'); core.int(out_features, 'Linear')
    self.in_features, self.out_features = in_features, out_features
    self.weight = Parameter(T.empty({ out_features, in_features }, factory_opts(o)))
    if o.bias then self.bias = Parameter(T.empty({ out_features }, factory_opts(o))) end
    self:reset_parameters()
  end

  -- kaiming_uniform_(a = sqrt(5)) for the weight, U(±1/sqrt(fan_in)) for the bias, as PyTorch.
  function Linear:reset_parameters()
    init.kaiming_uniform_(self.weight, math.sqrt(5))
    if self.bias then
      local bound = self.in_features > 0 and 1 / math.sqrt(self.in_features) or 0
      init.uniform_(self.bias, -bound, bound)
    end
  end

  function Linear:forward(x) return T.F.linear(x, self.weight, self.bias) end

  function Linear:extra_repr()
    return string.format('in_features=%d, out_features=%d, bias=%s', self.in_features, self.out_features,
      tostring(self.bias ~= nil))
  end

  -- ---- Conv2d ------------------------------------------------------------------------------------
  local Conv2d = Module:extend('Conv2d')
  nn.Conv2d = Conv2d

  function Conv2d:__init(in_channels, out_channels, kernel_size, opts)
    local o = options('Conv2d', opts, { stride = 1, padding = 0, dilation = 1, groups = 1, bias = true,
      dtype = NONE, device = NONE })
    if in_channels % o.groups ~= 0 or out_channels % o.groups ~= 0 then
      error(string.format('Conv2d: in_channels %d and out_channels %d must be divisible by groups %d',
        in_channels, out_channels, o.groups), 2)
    end
    local k = pair(kernel_size)
    self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
    self.stride, self.padding, self.dilation, self.groups = pair(o.stride), pair(o.padding), pair(o.dilation), o.groups
    self.weight = Parameter(T.empty({ out_channels, in_channels / o.groups, k[1], k[2] }, factory_opts(o)))
    if o.bias then self.bias = Parameter(T.empty({ out_channels }, factory_opts(o))) end
    self:reset_parameters()
  end

  function Conv2d:reset_parameters()
    init.kaiming_uniform_(self.weight, math.sqrt(5))
    if self.bias then
      local fan_in = init.calculate_fan_in_and_fan_out(self.weight)
      local bound = fan_in > 0 and 1 / math.sqrt(fan_in) or 0
      init.uniform_(self.bias, -bound, bound)
    end
  end

  function Conv2d:forward(x)
    return T.F.conv2d(x, self.weight, self.bias, { stride = self.stride, padding = self.padding,
      dilation = self.dilation, groups = self.groups })
  end

  function Conv2d:extra_repr()
    local s = string.format('%d, %d, kernel_size=(%d, %d), stride=(%d, %d)', self.in_channels, self.out_channels,
      self.kernel_size[1], self.kernel_size[2], self.stride[1], self.stride[2])
    if self.padding[1] ~= 0 or self.padding[2] ~= 0 then s = s .. string.format(', padding=(%d, %d)', self.padding[1], self.padding[2]) end
    if self.dilation[1] ~= 1 or self.dilation[2] ~= 1 then s = s .. string.format(', dilation=(%d, %d)', self.dilation[1], self.dilation[2]) end
    if self.groups ~= 1 then s = s .. ', groups=' .. self.groups end
    if not self.bias then s = s .. ', bias=false' end
    return s
  end

  -- ---- normalization -----------------------------------------------------------------------------
  local LayerNorm = Module:extend('LayerNorm')
  nn.LayerNorm = LayerNorm

  function LayerNorm:__init(normalized_shape, opts)
    local o = options('LayerNorm', opts, { eps = 1e-5, elementwise_affine = true, bias = true, dtype = NONE, device = NONE })
    local shape = type(normalized_shape) == 'table' and normalized_shape or { normalized_shape }
    self.normalized_shape, self.eps = shape, o.eps
    if o.elementwise_affine then
      self.weight = Parameter(T.ones(shape, factory_opts(o)))
      if o.bias then self.bias = Parameter(T.zeros(shape, factory_opts(o))) end
    end
  end

  function LayerNorm:forward(x) return T.F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps) end

  function LayerNorm:extra_repr()
    return string.format('(%s), eps=%g, elementwise_affine=%s', table.concat(self.normalized_shape, ', '), self.eps,
      tostring(self.weight ~= nil))
  end

  local BatchNorm2d = Module:extend('BatchNorm2d')
  nn.BatchNorm2d = BatchNorm2d

  function BatchNorm2d:__init(num_features, opts)
    local o = options('BatchNorm2d', opts, { eps = 1e-5, momentum = 0.1, affine = true, track_running_stats = true,
      dtype = NONE, device = NONE })
    self.num_features, self.eps, self.momentum = num_features, o.eps, o.momentum
    if o.affine then
      self.weight = Parameter(T.ones({ num_features }, factory_opts(o)))
      self.bias = Parameter(T.zeros({ num_features }, factory_opts(o)))
    end
    if o.track_running_stats then
      self.running_mean = Buffer(T.zeros({ num_features }, factory_opts(o)))
      self.running_var = Buffer(T.ones({ num_features }, factory_opts(o)))
      self.num_batches_tracked = Buffer(T.zeros({}, { dtype = 'int64', device = o.device }))
    end
  end

  function BatchNorm2d:forward(x)
    if x:dim() ~= 4 then error(string.format('BatchNorm2d: expected a 4-D input [N, C, H, W], got %d dims', x:dim()), 2) end
    local use_batch_stats = self.training or self.running_mean == nil
    if self.training and self.num_batches_tracked then
      T.no_grad(function() self.num_batches_tracked:add_(1) end)
    end
    return T.F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, use_batch_stats,
      self.momentum, self.eps)
  end

  function BatchNorm2d:extra_repr()
    return string.format('%d, eps=%g, momentum=%g, affine=%s', self.num_features, self.eps, self.momentum,
      tostring(self.weight ~= nil))
  end

  local GroupNorm = Module:extend('GroupNorm')
  nn.GroupNorm = GroupNorm

  function GroupNorm:__init(num_groups, num_channels, opts)
    local o = options('GroupNorm', opts, { eps = 1e-5, affine = true, dtype = NONE, device = NONE })
    if num_channels % num_groups ~= 0 then
      error(string.format('GroupNorm: num_channels %d must be divisible by num_groups %d', num_channels, num_groups), 2)
    end
    self.num_groups, self.num_channels, self.eps = num_groups, num_channels, o.eps
    if o.affine then
      self.weight = Parameter(T.ones({ num_channels }, factory_opts(o)))
      self.bias = Parameter(T.zeros({ num_channels }, factory_opts(o)))
    end
  end

  function GroupNorm:forward(x) return T.F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps) end

  function GroupNorm:extra_repr()
    return string.format('%d, %d, eps=%g, affine=%s', self.num_groups, self.num_channels, self.eps, tostring(self.weight ~= nil))
  end

  -- ---- activations, dropout, reshaping -----------------------------------------------------------
  local function activation(name, fn)
    local M = Module:extend(name)
    M.forward = function(_, x) return fn(x) end
    nn[name] = M
    return M
  end
  activation('GELU', function(x) return x:gelu() end)
  activation('ReLU', function(x) return x:relu() end)
  activation('SiLU', function(x) return x:silu() end)
  activation('Sigmoid', function(x) return x:sigmoid() end)
  activation('Tanh', function(x) return x:tanh() end)

  local Dropout = Module:extend('Dropout')
  nn.Dropout = Dropout
  function Dropout:__init(p)
    self.p = core.check_probability('Dropout', 'p', p, 0.5)
  end
  function Dropout:forward(x) return T.F.dropout(x, self.p, self.training) end
  function Dropout:extra_repr() return string.format('p=%g', self.p) end

  -- Stochastic depth per sample (timm's DropPath).
  local DropPath = Module:extend('DropPath')
  nn.DropPath = DropPath
  function DropPath:__init(p, scale_by_keep)
    self.drop_prob, self.scale_by_keep = core.check_probability('DropPath', 'p', p, 0), scale_by_keep ~= false
  end
  function DropPath:forward(x) return T.F.drop_path(x, self.drop_prob, self.training, self.scale_by_keep) end
  function DropPath:extra_repr() return string.format('drop_prob=%.3f', self.drop_prob) end

  local PixelShuffle = Module:extend('PixelShuffle')
  nn.PixelShuffle = PixelShuffle
  function PixelShuffle:__init(upscale_factor) self.upscale_factor = core.int(upscale_factor, 'PixelShuffle') end
  function PixelShuffle:forward(x) return T.F.pixel_shuffle(x, self.upscale_factor) end
  function PixelShuffle:extra_repr() return 'upscale_factor=' .. self.upscale_factor end

  local Flatten = Module:extend('Flatten')
  nn.Flatten = Flatten
  function Flatten:__init(start_dim, end_dim) self.start_dim, self.end_dim = start_dim or 1, end_dim or -1 end
  function Flatten:forward(x) return x:flatten(self.start_dim, self.end_dim) end
end
