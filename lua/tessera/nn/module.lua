-- tessera.nn.module — the Module base class (Torch7's nn with PyTorch's naming) and containers.
--
--   local Block = nn.Module:extend('Block')
--   function Block:__init(dim)
--     self.norm = nn.LayerNorm(dim)                 -- a child module: registered by assignment
--     self.scale = nn.Parameter(T.ones(dim))        -- a parameter
--     self.step = nn.Buffer(T.zeros(1))             -- a buffer (saved in state_dict)
--   end
--   function Block:forward(x) return self.norm(x) * self.scale end
--   local b = Block(8); local y = b(T.randn(2, 8))
--
-- Registration order is kept, so named_parameters() and state_dict() list names exactly as
-- PyTorch does ('blocks.0.attn.qkv.weight'): a module's own parameters first, then each child's
-- subtree in the order the children were assigned.
local each = require 'tessera.each'
local T = require 'tessera.core'.T
local core = require 'tessera.core'

local nn = {}

-- ---- parameters and buffers as values to assign -----------------------------------------------
local ParameterMark, BufferMark = {}, {}

-- nn.Parameter(t[, requires_grad = true]): marks t to be registered as a parameter.
function nn.Parameter(t, requires_grad)
  if not core.is_tensor(t) then error('Parameter: expected a tensor, got ' .. type(t), 2) end
  if requires_grad == nil then requires_grad = true end
  return setmetatable({ tensor = t, requires_grad = requires_grad }, ParameterMark)
end

-- nn.Buffer(t[, persistent = true]): marks t as a buffer; persistent ones go into state_dict.
function nn.Buffer(t, persistent)
  if t ~= nil and not core.is_tensor(t) then error('Buffer: expected a tensor, got ' .. type(t), 2) end
  return setmetatable({ tensor = t, persistent = persistent ~= false }, BufferMark)
end

-- ---- classes ----------------------------------------------------------------------------------
-- Every instance keeps its state in one table, rawget(self, '__s'):
--   fields (plain values), params / buffers / children (name → value), and their name orders.
local function state(self) return rawget(self, '__s') end

local Module = { __name = 'Module' }
nn.Module = Module

local function is_module(v) return type(v) == 'table' and rawget(v, '__s') ~= nil end
nn.is_module = is_module

local function instance_index(class)
  return function(self, k)
    local s = rawget(self, '__s')
    local v = s.params[k]
    if v ~= nil then return v end
    v = s.children[k]
    if v ~= nil then return v end
    v = s.buffers[k]
    if v ~= nil then return v end
    v = s.fields[k]
    if v ~= nil then return v end
    return class[k]
  end
end

-- Registers value under name as a `kind` (parameter, buffer, module); a name another kind or a
-- plain attribute already uses is an error, as in PyTorch. Order is that of first registration.
local function register(self, what, kind, list, order, name, value)
  local s = rawget(self, '__s')
  local taken = s.kind_of[name] or (s.fields[name] ~= nil and 'attribute')
  if taken and taken ~= kind then
    error(string.format("%s: '%s' is already a %s of %s", what, name, taken, self.__name), 3)
  end
  if not s.kind_of[name] then order[#order + 1] = name end
  s.kind_of[name] = kind
  list[name] = value
end

local function instance_newindex(self, k, v)
  local s = state(self)
  local mt = getmetatable(v)
  if mt == ParameterMark then
    self:register_parameter(k, v.tensor, v.requires_grad)
  elseif mt == BufferMark then
    self:register_buffer(k, v.tensor, v.persistent)
  elseif is_module(v) then
    self:add_module(k, v)
  elseif s.kind_of[k] == 'parameter' then
    -- as PyTorch: a parameter takes another Parameter, or nil (it stays registered, empty)
    if v ~= nil then
      error(string.format("cannot assign a %s to parameter '%s' of %s (wrap it: nn.Parameter(t); or nil to clear it)",
        core.is_tensor(v) and 'plain tensor' or type(v), k, self.__name), 2)
    end
    s.params[k] = nil
  elseif s.kind_of[k] == 'buffer' then -- a registered buffer, possibly nil until now
    s.buffers[k] = v
  elseif s.kind_of[k] == 'module' then
    if v ~= nil then error(string.format("cannot assign %s to child module '%s'", type(v), k), 2) end
    s.children[k], s.kind_of[k] = nil, nil
    for i, name in ipairs(s.child_order) do
      if name == k then table.remove(s.child_order, i) break end
    end
  else
    s.fields[k] = v
  end
end

-- Module:extend(name) makes a subclass; calling the class constructs an instance and runs
-- __init(...) up the chain as each class's __init chooses (call Parent.__init(self, ...) yourself).
function Module:extend(name)
  local class = setmetatable({ __name = name, __parent = self }, {
    __index = self,
    __call = function(cls, ...) return cls:new(...) end,
  })
  class.__mt = {
    __index = instance_index(class),
    __newindex = instance_newindex,
    __call = function(m, ...) return m:forward(...) end,
    __tostring = function(m) return m:__repr() end,
  }
  return class
end

function Module:new(...)
  local self = setmetatable({ __s = {
    fields = { training = true }, params = {}, param_order = {}, buffers = {}, buffer_order = {},
    persistent = {}, children = {}, child_order = {}, kind_of = {}, -- kind_of[name]: parameter|buffer|module
  } }, self.__mt)
  if self.__init then self:__init(...) end
  return self
end

function Module:__init() end

function Module:forward()
  error(string.format('%s: forward() is not implemented', self.__name), 2)
end

-- ---- registration -------------------------------------------------------------------------------
local function check_name(kind, name)
  if type(name) ~= 'string' or name == '' or name:find('.', 1, true) then
    error(string.format('%s: invalid name %s (a non-empty string without dots)', kind, tostring(name)), 3)
  end
end

function Module:register_parameter(name, t, requires_grad)
  check_name('register_parameter', name)
  if t ~= nil then
    if not core.is_tensor(t) then error('register_parameter: expected a tensor for ' .. name, 2) end
    if requires_grad ~= false and t:is_floating_point() then t:requires_grad_(true) end
  end
  local s = state(self)
  register(self, 'register_parameter', 'parameter', s.params, s.param_order, name, t)
  return t
end

function Module:register_buffer(name, t, persistent)
  check_name('register_buffer', name)
  local s = state(self)
  register(self, 'register_buffer', 'buffer', s.buffers, s.buffer_order, name, t)
  s.persistent[name] = persistent ~= false
  return t
end

function Module:add_module(name, m)
  check_name('add_module', name)
  if m ~= nil and not is_module(m) then error('add_module: ' .. name .. ' is not a module', 2) end
  local s = state(self)
  register(self, 'add_module', 'module', s.children, s.child_order, name, m)
  return m
end

-- ---- traversal ----------------------------------------------------------------------------------
-- Pre-order walk: fn(prefix, module) for self and every descendant, in registration order.
local function walk(m, prefix, fn)
  fn(prefix, m)
  local s = state(m)
  for _, name in ipairs(s.child_order) do
    local child = s.children[name]
    if child then walk(child, prefix .. name .. '.', fn) end
  end
end

local function collect(m, kind)
  local out = {}
  walk(m, '', function(prefix, mod)
    local s = state(mod)
    local list, order = s[kind], s[kind == 'params' and 'param_order' or 'buffer_order']
    for _, name in ipairs(order) do
      local t = list[name]
      if t ~= nil then out[#out + 1] = { prefix .. name, t, mod, name } end
    end
  end)
  return out
end

-- Iterators yielding (name, tensor), as PyTorch's named_parameters()/named_buffers().
local function iterate(list)
  local i = 0
  return function()
    i = i + 1
    local e = list[i]
    if e then return e[1], e[2] end
  end
end

-- The entries of collect() with each tensor once (tied weights appear under their first name),
-- as PyTorch's named_parameters() does.
local function unique(list)
  local seen, out = {}, {}
  for _, e in ipairs(list) do
    local key = tostring(e[2].h) -- the C tensor: one parameter may sit in several modules
    if not seen[key] then
      seen[key] = true
      out[#out + 1] = e
    end
  end
  return out
end

function Module:named_parameters() return iterate(unique(collect(self, 'params'))) end
function Module:named_buffers() return iterate(unique(collect(self, 'buffers'))) end

local function tensors_of(list)
  local out = {}
  for _, e in ipairs(list) do out[#out + 1] = e[2] end
  return out
end

function Module:parameters() return tensors_of(unique(collect(self, 'params'))) end
function Module:buffers() return tensors_of(unique(collect(self, 'buffers'))) end

function Module:named_children()
  local s, i = state(self), 0
  return function()
    repeat
      i = i + 1
      local name = s.child_order[i]
      if name == nil then return nil end
      if s.children[name] then return name, s.children[name] end
    until false
  end
end

function Module:children()
  local out = {}
  for _, m in self:named_children() do out[#out + 1] = m end
  return out
end

function Module:named_modules()
  local list = {}
  walk(self, '', function(prefix, m) list[#list + 1] = { prefix:sub(1, -2), m } end)
  return iterate(list)
end

function Module:modules()
  local out = {}
  walk(self, '', function(_, m) out[#out + 1] = m end)
  return out
end

-- fn(m) for every descendant, children before their parent (PyTorch's order), then self.
function Module:apply(fn)
  for _, child in self:named_children() do child:apply(fn) end
  fn(self)
  return self
end

function Module:num_parameters(trainable_only)
  local n = 0
  for _, p in self:named_parameters() do
    if not trainable_only or p.requires_grad then n = n + p:numel() end
  end
  return n
end

-- ---- modes and gradients --------------------------------------------------------------------------
function Module:train(mode)
  if mode == nil then mode = true end
  walk(self, '', function(_, m) state(m).fields.training = mode and true or false end)
  return self
end

function Module:eval() return self:train(false) end

function Module:zero_grad()
  for _, p in self:named_parameters() do p.grad = nil end
end

function Module:requires_grad_(requires)
  if requires == nil then requires = true end
  for _, p in self:named_parameters() do p:requires_grad_(requires) end
  return self
end

-- ---- state dicts ----------------------------------------------------------------------------------
-- name → tensor (detached, sharing storage) for every parameter and persistent buffer.
function Module:state_dict()
  local sd = {}
  for _, e in ipairs(collect(self, 'params')) do sd[e[1]] = e[2]:detach() end
  for _, e in ipairs(collect(self, 'buffers')) do
    if state(e[3]).persistent[e[4]] then sd[e[1]] = e[2]:detach() end
  end
  return sd
end

-- Names of state_dict() entries in PyTorch's order.
function Module:state_dict_keys()
  local keys = {}
  walk(self, '', function(prefix, m)
    local s = state(m)
    for _, name in ipairs(s.param_order) do if s.params[name] ~= nil then keys[#keys + 1] = prefix .. name end end
    for _, name in ipairs(s.buffer_order) do
      if s.buffers[name] ~= nil and s.persistent[name] then keys[#keys + 1] = prefix .. name end
    end
  end)
  return keys
end

local function shape_string(t) return '[' .. table.concat(t.shape, ',') .. ']' end

-- Copies matching tensors in place (dtype converted). Reports missing keys, unexpected keys and
-- shape mismatches; with strict (the default) any of them is an error listing all of them.
function Module:load_state_dict(sd, opts)
  opts = opts or {}
  local strict = opts.strict ~= false
  local own = {}
  for _, e in ipairs(collect(self, 'params')) do own[e[1]] = e[2] end
  for _, e in ipairs(collect(self, 'buffers')) do
    if state(e[3]).persistent[e[4]] then own[e[1]] = e[2] end
  end
  local missing, unexpected, mismatched = {}, {}, {}
  for _, name in ipairs(self:state_dict_keys()) do
    if sd[name] == nil then missing[#missing + 1] = name end
  end
  local names = {}
  for name in each(sd) do names[#names + 1] = name end
  table.sort(names)
  local copies = {}
  for _, name in ipairs(names) do
    local target, src = own[name], sd[name]
    if target == nil then
      unexpected[#unexpected + 1] = name
    elseif not core.is_tensor(src) then
      mismatched[#mismatched + 1] = string.format('%s (got a %s, not a tensor)', name, type(src))
    elseif shape_string(src) ~= shape_string(target) then
      mismatched[#mismatched + 1] = string.format('%s (checkpoint %s, model %s)', name, shape_string(src), shape_string(target))
    else
      copies[#copies + 1] = { target, src }
    end
  end
  table.sort(missing)
  -- shape mismatches are errors even when not strict, as in PyTorch
  if #mismatched > 0 or (strict and #missing + #unexpected > 0) then
    local parts = {}
    if #missing > 0 then parts[#parts + 1] = 'missing keys: ' .. table.concat(missing, ', ') end
    if #unexpected > 0 then parts[#parts + 1] = 'unexpected keys: ' .. table.concat(unexpected, ', ') end
    if #mismatched > 0 then parts[#parts + 1] = 'shape mismatches: ' .. table.concat(mismatched, '; ') end
    error(string.format('load_state_dict(%s): %s', self.__name, table.concat(parts, '; ')), 2)
  end
  T.no_grad(function()
    for _, c in ipairs(copies) do c[1]:copy_(c[2]) end
  end)
  return { missing_keys = missing, unexpected_keys = unexpected, mismatched_keys = mismatched }
end

-- ---- devices and dtypes ---------------------------------------------------------------------------
-- m:to('cuda'), m:to('float64'), m:to{device = ..., dtype = ...}: parameters and buffers are
-- replaced by converted tensors (parameters stay leaves with their requires_grad); integer
-- buffers keep their dtype.
function Module:to(a, b)
  local spec = type(a) == 'table' and a or {}
  if type(a) ~= 'table' then
    for _, x in ipairs { a, b } do
      if x == 'cpu' or (type(x) == 'string' and x:match('^cuda')) then spec.device = x
      elseif x ~= nil then spec.dtype = x end
    end
  end
  local function convert(t)
    local target = {}
    target.device = spec.device
    if spec.dtype and t:is_floating_point() then target.dtype = spec.dtype end
    return t:to(target)
  end
  -- a tensor shared by several modules (tied weights) becomes one new tensor, shared again
  local done = {}
  local function converted_param(p)
    local key = tostring(p.h)
    if done[key] then return done[key] end
    local q = convert(p)
    if q.h == p.h then
      q = p
    else
      q = q:detach()
      if p.requires_grad then q:requires_grad_(true) end
      local g = p.grad
      if g ~= nil then q.grad = convert(g) end -- gradients follow, as PyTorch's
    end
    done[key] = q
    return q
  end
  T.no_grad(function()
    walk(self, '', function(_, m)
      local s = state(m)
      for name, p in each(s.params) do s.params[name] = converted_param(p) end
      for name, buf in each(s.buffers) do
        local key = tostring(buf.h)
        done[key] = done[key] or convert(buf)
        s.buffers[name] = done[key]
      end
    end)
  end)
  return self
end

-- ---- printing -------------------------------------------------------------------------------------
function Module:extra_repr() return '' end

function Module:__repr()
  local s = state(self)
  local head = self.__name .. '(' .. self:extra_repr()
  if #s.child_order == 0 then return head .. ')' end
  local lines = { head }
  for _, name in ipairs(s.child_order) do
    local child = s.children[name]
    if child then
      local body = tostring(child):gsub('\n', '\n  ')
      lines[#lines + 1] = '  (' .. name .. '): ' .. body
    end
  end
  return table.concat(lines, '\n') .. '\n)'
end

-- ---- containers -----------------------------------------------------------------------------------
-- Sequential(m1, m2, ...) or Sequential{m1, m2, ...}: children named '0', '1', ...
local Sequential = Module:extend('Sequential')
nn.Sequential = Sequential

function Sequential:__init(...)
  local list = select('#', ...) == 1 and not is_module((...)) and (...) or { ... }
  for i, m in ipairs(list) do self:add_module(tostring(i - 1), m) end
end

function Sequential:forward(x)
  for _, m in self:named_children() do x = m(x) end
  return x
end

function Sequential:append(m)
  self:add_module(tostring(#state(self).child_order), m)
  return self
end

-- ModuleList{m1, m2, ...}: indexed from 0 as in PyTorch (list[0]); list:len(); list:iter().
local ModuleList = Module:extend('ModuleList')
nn.ModuleList = ModuleList

function ModuleList:__init(list)
  for i, m in ipairs(list or {}) do self:add_module(tostring(i - 1), m) end
end

local list_index = ModuleList.__mt.__index
ModuleList.__mt.__index = function(self, k)
  if type(k) == 'number' then
    local s = state(self)
    local n = #s.child_order
    if k < 0 then k = k + n end
    local m = s.children[tostring(k)]
    if m == nil then error(string.format('ModuleList: index %s out of range for %d modules', k, n), 2) end
    return m
  end
  return list_index(self, k)
end
function ModuleList:len() return #state(self).child_order end

function ModuleList:append(m)
  self:add_module(tostring(#state(self).child_order), m)
  return self
end

-- for i, m in list:iter() do ... end  (i from 0)
function ModuleList:iter()
  local s, i = state(self), -1
  return function()
    i = i + 1
    local m = s.children[tostring(i)]
    if m then return i, m end
  end
end

function ModuleList:forward()
  error('ModuleList has no forward(); iterate over it in the parent module', 2)
end

local Identity = Module:extend('Identity')
nn.Identity = Identity
function Identity:forward(x) return x end

return nn
