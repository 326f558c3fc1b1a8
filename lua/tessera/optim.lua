-- tessera.optim — optimizers, gradient clipping, parameter groups, learning-rate schedules,
-- gradient accumulation and float16 loss scaling, as torch.optim, torch.cuda.amp, timm and the
-- MAE/BEiT recipes have them.
--
--   local opt = T.optim.AdamW(model:parameters(), {lr = 1e-3, betas = {0.9, 0.999}, weight_decay = 0.05})
--   loss:backward(); T.optim.clip_grad_norm_(model:parameters(), 1.0); opt:step(); opt:zero_grad()
--
-- Parameter groups:
--   T.optim.AdamW({ {params = decay, weight_decay = 0.05}, {params = no_decay, weight_decay = 0} }, {lr = 1e-3})
-- A group may carry any extra keys (lr_scale, param_names, ...); they are kept, saved in
-- state_dict() and read by adjust_learning_rate (lr = schedule(epoch) * lr_scale).
--
-- Each step is one fused C call per set of groups sharing betas/eps (momentum for SGD), with
-- per-tensor lr and weight decay: ts_adamw_step / ts_sgd_step. Parameters without a gradient are
-- skipped (their step count does not advance, as in PyTorch), and so are frozen parameters
-- (requires_grad = false). Optimizer state is float32 for float32/float16/bfloat16 parameters
-- and float64 for float64 ones.
local each = require 'tessera.each'
local core = require 'tessera.core'
local ffi, C, T = core.ffi, core.C, core.T
local handle, check = core.handle, core.check

local optim = {}
T.optim = optim

-- ---- argument checks -----------------------------------------------------------------------------
local function is_number(x) return type(x) == 'number' and x == x end

local check_nonnegative, check_positive, check_integer, check_boolean =
  core.check_nonnegative, core.check_positive, core.check_integer, core.check_boolean

local function check_betas(what, betas)
  if type(betas) ~= 'table' or core.is_tensor(betas) or #betas ~= 2 then
    error(string.format('%s: betas must be a list of two numbers in [0, 1), got %s', what, tostring(betas)), 0)
  end
  for i = 1, 2 do
    local b = betas[i]
    if not is_number(b) or b < 0 or b >= 1 then
      error(string.format('%s: betas[%d] must be in [0, 1), got %s', what, i, tostring(b)), 0)
    end
  end
  return betas
end

-- A norm type: a number > 0, math.huge or 'inf'.
local function norm_type_arg(what, p)
  if p == nil then return 2 end
  if p == 'inf' then return math.huge end
  if not is_number(p) or p <= 0 then
    error(string.format("%s: norm_type must be a number > 0, math.huge or 'inf', got %s", what, tostring(p)), 0)
  end
  return p
end

-- ---- parameter lists -------------------------------------------------------------------------------
-- A list of tensors from a tensor, a list of tensors, or an iterator function yielding tensors or
-- (name, tensor) pairs (model:named_parameters()).
local function tensor_list(what, params)
  if core.is_tensor(params) then return { params } end
  local out = {}
  if type(params) == 'function' then
    for a, b in params do out[#out + 1] = core.is_tensor(b) and b or a end
  elseif type(params) == 'table' then
    for i = 1, #params do out[i] = params[i] end
  else
    error(string.format('%s: params must be a tensor, a list of tensors or an iterator, got %s', what, type(params)), 0)
  end
  for i, p in ipairs(out) do
    if not core.is_tensor(p) then
      error(string.format('%s: params[%d] is a %s, expected a tensor', what, i, type(p)), 0)
    end
  end
  return out
end
optim.tensor_list = tensor_list

local function tensor_key(t) return tostring(ffi.cast('uintptr_t', handle(t, 'optim'))) end

local function check_param(what, p, where)
  if not p:is_floating_point() then
    error(string.format('%s: %s is %s; only floating point tensors can be optimized', what, where, p.dtype), 0)
  end
  if not p.is_leaf then
    error(string.format("%s: %s is not a leaf tensor (made by %s); can't optimize a non-leaf tensor", what, where,
      p.grad_fn), 0)
  end
end

-- params_or_groups → a list of group tables (shallow copies; extra keys kept).
local function group_list(what, params)
  if type(params) == 'table' and not core.is_tensor(params) and params.params ~= nil then params = { params } end
  local groups = {}
  if type(params) == 'table' and not core.is_tensor(params) and type(params[1]) == 'table'
      and not core.is_tensor(params[1]) then
    for i, g in ipairs(params) do
      if type(g) ~= 'table' or g.params == nil then
        error(string.format('%s: parameter group %d must be a table with a params field', what, i), 0)
      end
      local copy = core.merge(g)
      copy.params = tensor_list(what, g.params)
      groups[i] = copy
    end
  else
    groups[1] = { params = tensor_list(what, params) }
  end
  local total = 0
  for _, g in ipairs(groups) do total = total + #g.params end
  if total == 0 then error(what .. ': optimizer got an empty parameter list', 0) end
  return groups
end

-- ---- the optimizer base ----------------------------------------------------------------------------
-- An optimizer class provides: name, defaults (option → default value), check_group(what, g),
-- state_keys (a set), and run(buckets) doing the fused calls.
local Optimizer = {}
Optimizer.__index = Optimizer
optim.Optimizer = Optimizer

local function new_optimizer(class, params, opts)
  local what = class.name
  opts = core.options(what, opts, class.defaults)
  local defaults = core.merge(class.defaults, opts)
  class.check_group(what, defaults)
  local self = setmetatable({ defaults = defaults, param_groups = {}, state = {}, seen = {} }, class)
  for _, g in ipairs(group_list(what, params)) do self:add_param_group(g) end
  return self
end

-- Adds a group (missing hyper-parameters from the defaults); refuses parameters already present.
function Optimizer:add_param_group(group)
  local what = self.name .. ': add_param_group'
  if type(group) ~= 'table' or group.params == nil then error(what .. ': expected a table with a params field', 0) end
  local g = core.merge(group)
  g.params = tensor_list(what, group.params)
  for k, v in each(self.defaults) do
    if g[k] == nil then g[k] = type(v) == 'table' and { unpack(v) } or v end
  end
  self.check_group(self.name, g)
  if g.lr_scale ~= nil then check_nonnegative(self.name, 'lr_scale', g.lr_scale) end
  local here = {}
  for i, p in ipairs(g.params) do
    check_param(self.name, p, string.format('parameter %d of group %d', i, #self.param_groups + 1))
    local key = tensor_key(p)
    if self.seen[key] or here[key] then
      error(self.name .. ': some parameters appear in more than one parameter group (or twice in one)', 0)
    end
    here[key] = true
  end
  for k in each(here) do self.seen[k] = true end
  self.param_groups[#self.param_groups + 1] = g
end

-- Frees the handles in a list (the tensors live on where they are still referenced).
local function free_all(tensors)
  for _, t in ipairs(tensors) do t:free() end
end

-- Clears gradients: set_to_none (default true) drops them, false zeroes them in place.
function Optimizer:zero_grad(set_to_none)
  for _, g in ipairs(self.param_groups) do
    for _, p in ipairs(g.params) do
      if set_to_none == false then
        local grad = p.grad
        if grad ~= nil then
          grad:zero_()
          grad:free() -- this handle only: the parameter keeps its .grad
        end
      else
        p.grad = nil
      end
    end
  end
end

-- Runs closure (with grad enabled) if given, updates the parameters, returns the closure's value.
function Optimizer:step(closure)
  local loss
  if closure ~= nil then loss = T.enable_grad(closure) end
  local buckets, order = {}, {}
  for _, g in ipairs(self.param_groups) do
    self.check_group(self.name, g)
    local key = self.bucket_key(g)
    local b = buckets[key]
    if not b then
      b = { group = g, params = {}, grads = {}, groups = {} }
      buckets[key] = b
      order[#order + 1] = b
    end
    for _, p in ipairs(g.params) do
      local grad = p.requires_grad and p.grad or nil
      if grad ~= nil then
        local n = #b.params + 1
        b.params[n], b.grads[n], b.groups[n] = p, grad, g
      end
    end
  end
  for _, b in ipairs(order) do
    if #b.params > 0 then self:run(b) end
    -- the handles, not the gradients: without this the gradients of a step could outlive
    -- zero_grad until the next garbage collection
    free_all(b.grads)
  end
  return loss
end

-- The dtype optimizer state takes for a parameter.
local function state_dtype(p) return p.dtype == 'float64' and 'float64' or 'float32' end
optim.state_dtype = state_dtype

local function state_zeros(p) return T.zeros_like(p, { dtype = state_dtype(p) }) end

-- C arrays for one bucket: tensors of each list, per-tensor lr and weight decay.
local function c_tensors(list, pick)
  local arr = ffi.new('ts_tensor*[?]', #list)
  for i, x in ipairs(list) do
    local t = pick and pick(x) or x
    arr[i - 1] = handle(t, 'optim')
  end
  return arr
end

local function c_group_values(b, key)
  local arr = ffi.new('double[?]', #b.params)
  for i, g in ipairs(b.groups) do arr[i - 1] = g[key] end
  return arr
end

-- state_dict(): {state = {[i] = {...}}, param_groups = {{..., params = {i, ...}}}} with 0-based
-- parameter indices in group order, as PyTorch. State tensors are the live tensors (not copies).
function Optimizer:state_dict()
  local state, groups, index = {}, {}, 0
  for gi, g in ipairs(self.param_groups) do
    local saved = { params = {} }
    for k, v in each(g) do
      if k ~= 'params' then saved[k] = type(v) == 'table' and { unpack(v) } or v end
    end
    for i, p in ipairs(g.params) do
      saved.params[i] = index
      local s = self.state[p]
      if s then
        state[index] = core.merge(s)
      end
      index = index + 1
    end
    groups[gi] = saved
  end
  return { state = state, param_groups = groups }
end

-- One saved state entry → this optimizer's state for parameter p (copies, cast to the state dtype).
local function load_state_entry(self, what, index, entry, p)
  if type(entry) ~= 'table' then error(string.format('%s: state %d must be a table', what, index), 0) end
  local out = {}
  for k, v in each(entry) do
    if not self.state_keys[k] then
      error(string.format("%s: state %d has key '%s', which %s does not keep (expected: %s)", what, index,
        tostring(k), self.name, table.concat(core.sorted_names(self.state_keys), ', ')), 0)
    end
    if core.is_tensor(v) and k ~= 'step' then
      if tostring(v.shape) ~= tostring(p.shape) then
        error(string.format('%s: state %d %s has shape %s but its parameter has shape %s', what, index, k,
          tostring(v.shape), tostring(p.shape)), 0)
      end
      out[k] = v:detach():to({ dtype = state_dtype(p), device = p.device }):clone()
    elseif k == 'step' then
      local step = core.is_tensor(v) and v:item() or v
      check_integer(what, string.format('state %d step', index), step, 0)
      out[k] = step
    else
      error(string.format('%s: state %d %s must be a tensor, got %s', what, index, k, type(v)), 0)
    end
  end
  return out
end

-- Loads a state_dict() (of an optimizer over parameters of the same shapes, in the same groups).
function Optimizer:load_state_dict(sd)
  local what = self.name .. ': load_state_dict'
  if type(sd) ~= 'table' or type(sd.state) ~= 'table' or type(sd.param_groups) ~= 'table' then
    error(what .. ': expected a table with state and param_groups', 0)
  end
  if #sd.param_groups ~= #self.param_groups then
    error(string.format('%s: the state dict has %d parameter groups, the optimizer %d', what, #sd.param_groups,
      #self.param_groups), 0)
  end
  local by_index, groups = {}, {}
  for gi, saved in ipairs(sd.param_groups) do
    local current = self.param_groups[gi]
    if type(saved.params) ~= 'table' or #saved.params ~= #current.params then
      error(string.format("%s: group %d of the state dict has %s parameters, the optimizer's group has %d", what, gi,
        type(saved.params) == 'table' and tostring(#saved.params) or 'no', #current.params), 0)
    end
    local g = {}
    for k, v in each(saved) do g[k] = type(v) == 'table' and { unpack(v) } or v end
    for k, v in each(current) do
      if g[k] == nil then g[k] = v end -- keys the checkpoint lacks (param_names, ...) stay
    end
    g.params = current.params
    self.check_group(what, g)
    for i, index in ipairs(saved.params) do by_index[index] = current.params[i] end
    groups[gi] = g
  end
  local state = {}
  for index, entry in each(sd.state) do
    local p = by_index[index]
    if p == nil then
      error(string.format('%s: state for parameter index %s, which no group lists', what, tostring(index)), 0)
    end
    state[p] = load_state_entry(self, what, index, entry, p)
  end
  self.param_groups, self.state = groups, state
end

-- For name → tensor checkpoint formats (safetensors): a state_dict() as tensors named
-- 'state.<index>.<key>' (the step count as a 0-d float64 tensor, as PyTorch keeps it) plus
-- metadata {param_groups = ...} holding only plain values (JSON-encodable).
--   local tensors, meta = T.optim.flatten_state_dict(opt:state_dict())
--   T.save('opt.safetensors', tensors, {metadata = meta})
function optim.flatten_state_dict(sd)
  if type(sd) ~= 'table' or type(sd.state) ~= 'table' or type(sd.param_groups) ~= 'table' then
    error('flatten_state_dict: expected an optimizer state_dict (state and param_groups)', 0)
  end
  local tensors = {}
  for index, entry in each(sd.state) do
    for k, v in each(entry) do
      tensors[string.format('state.%d.%s', index, k)] = core.is_tensor(v) and v or T.tensor(v, { dtype = 'float64' })
    end
  end
  return tensors, { param_groups = sd.param_groups }
end

-- The inverse: metadata.param_groups may be the JSON text T.load hands back.
--   local tensors, meta = T.load('opt.safetensors'); opt:load_state_dict(T.optim.unflatten_state_dict(tensors, meta))
function optim.unflatten_state_dict(tensors, metadata)
  local what = 'unflatten_state_dict'
  if type(tensors) ~= 'table' or type(metadata) ~= 'table' then
    error(what .. ': expected tensors and metadata tables', 0)
  end
  local groups = metadata.param_groups
  if type(groups) == 'string' then groups = require('tessera.json').decode(groups) end
  if type(groups) ~= 'table' then error(what .. ': metadata has no param_groups', 0) end
  local state = {}
  for name, t in each(tensors) do
    local index, key = tostring(name):match('^state%.(%d+)%.(.+)$')
    if not index or not core.is_tensor(t) then
      error(string.format("%s: '%s' is not an optimizer state tensor (state.<index>.<key>)", what, tostring(name)), 0)
    end
    index = tonumber(index)
    state[index] = state[index] or {}
    state[index][key] = key == 'step' and t:item() or t
  end
  return { state = state, param_groups = groups }
end

function Optimizer:__tostring()
  local lines = { self.name .. ' (' }
  for i, g in ipairs(self.param_groups) do
    lines[#lines + 1] = string.format('Parameter Group %d', i - 1)
    local keys = {}
    for k in each(g) do if k ~= 'params' and k ~= 'param_names' then keys[#keys + 1] = k end end
    table.sort(keys)
    for _, k in ipairs(keys) do
      local v = g[k]
      if type(v) == 'table' then v = '(' .. table.concat(v, ', ') .. ')' end
      lines[#lines + 1] = string.format('    %s: %s', k, tostring(v))
    end
  end
  lines[#lines + 1] = ')'
  return table.concat(lines, '\n')
end

local function optimizer_class(name, defaults, state_keys)
  local class = setmetatable({ name = name, defaults = defaults, state_keys = state_keys }, { __index = Optimizer })
  class.__index = class
  class.__tostring = Optimizer.__tostring
  return class
end

-- ---- AdamW ------------------------------------------------------------------------------------------
local AdamW = optimizer_class('AdamW', { lr = 1e-3, betas = { 0.9, 0.999 }, eps = 1e-8, weight_decay = 1e-2 },
  { step = true, exp_avg = true, exp_avg_sq = true })
optim.AdamWClass = AdamW

function AdamW.check_group(what, g)
  check_nonnegative(what, 'lr', g.lr)
  check_betas(what, g.betas)
  check_nonnegative(what, 'eps', g.eps)
  check_nonnegative(what, 'weight_decay', g.weight_decay)
end

function AdamW.bucket_key(g) return string.format('%.17g %.17g %.17g', g.betas[1], g.betas[2], g.eps) end

function AdamW:run(b)
  local n = #b.params
  local steps = ffi.new('int64_t[?]', n)
  for i, p in ipairs(b.params) do
    local s = self.state[p]
    if not s then
      s = { step = 0, exp_avg = state_zeros(p), exp_avg_sq = state_zeros(p) }
      self.state[p] = s
    end
    steps[i - 1] = s.step + 1
  end
  local function field(name) return function(p) return self.state[p][name] end end
  check(C.ts_adamw_step(n, c_tensors(b.params), c_tensors(b.grads), c_tensors(b.params, field('exp_avg')),
    c_tensors(b.params, field('exp_avg_sq')), c_group_values(b, 'lr'), c_group_values(b, 'weight_decay'),
    b.group.betas[1], b.group.betas[2], b.group.eps, steps))
  for _, p in ipairs(b.params) do
    local s = self.state[p]
    s.step = s.step + 1
  end
end

-- T.optim.AdamW(params_or_groups, {lr = 1e-3, betas = {0.9, 0.999}, eps = 1e-8, weight_decay = 1e-2})
function optim.AdamW(params, opts) return new_optimizer(AdamW, params, opts) end

-- ---- SGD ---------------------------------------------------------------------------------------------
local SGD = optimizer_class('SGD', { lr = 1e-3, momentum = 0, dampening = 0, weight_decay = 0, nesterov = false },
  { momentum_buffer = true })
optim.SGDClass = SGD

function SGD.check_group(what, g)
  check_nonnegative(what, 'lr', g.lr)
  check_nonnegative(what, 'momentum', g.momentum)
  if not is_number(g.dampening) or math.abs(g.dampening) == math.huge then
    error(string.format('%s: dampening must be a finite number, got %s', what, tostring(g.dampening)), 0)
  end
  check_nonnegative(what, 'weight_decay', g.weight_decay)
  check_boolean(what, 'nesterov', g.nesterov)
  if g.nesterov and (g.momentum <= 0 or g.dampening ~= 0) then
    error(string.format('%s: Nesterov momentum requires a momentum > 0 and zero dampening (got momentum %s, dampening %s)',
      what, tostring(g.momentum), tostring(g.dampening)), 0)
  end
end

function SGD.bucket_key(g)
  return string.format('%.17g %.17g %s', g.momentum, g.dampening, tostring(g.nesterov))
end

function SGD:run(b)
  local n, g = #b.params, b.group
  local first, bufs = ffi.new('int[?]', n), nil
  local fresh = {}
  if g.momentum ~= 0 then
    for i, p in ipairs(b.params) do
      local s = self.state[p]
      if not s or not s.momentum_buffer then
        fresh[p] = state_zeros(p)
        first[i - 1] = 1
      end
    end
    bufs = c_tensors(b.params, function(p) return fresh[p] or self.state[p].momentum_buffer end)
  end
  check(C.ts_sgd_step(n, c_tensors(b.params), c_tensors(b.grads), bufs, c_group_values(b, 'lr'),
    c_group_values(b, 'weight_decay'), g.momentum, g.dampening, g.nesterov and 1 or 0, first))
  for p, buf in each(fresh) do
    self.state[p] = self.state[p] or {}
    self.state[p].momentum_buffer = buf
  end
end

-- T.optim.SGD(params_or_groups, {lr = 1e-3, momentum = 0, dampening = 0, weight_decay = 0, nesterov = false})
function optim.SGD(params, opts) return new_optimizer(SGD, params, opts) end

-- ---- gradient norms and clipping ----------------------------------------------------------------------
local function grads_of(what, params)
  local grads = {}
  for _, p in ipairs(tensor_list(what, params)) do
    local g = p.grad
    if g ~= nil then grads[#grads + 1] = g end
  end
  return grads
end

local function total_norm(grads, norm_type)
  local out = ffi.new('double[1]')
  check(C.ts_grad_norm(#grads, c_tensors(grads), norm_type, out))
  return out[0]
end

-- T.optim.grad_norm(params, norm_type = 2): the total norm of the parameters' gradients (a number).
function optim.grad_norm(params, norm_type)
  local grads = grads_of('grad_norm', params)
  if #grads == 0 then return 0 end
  local total = total_norm(grads, norm_type_arg('grad_norm', norm_type))
  free_all(grads)
  return total
end

-- T.optim.clip_grad_norm_(params, max_norm, norm_type = 2, error_if_nonfinite = false)
-- Scales the gradients by max_norm / (total_norm + 1e-6) when that is below 1 (as
-- torch.nn.utils.clip_grad_norm_) and returns the total norm before clipping, as a number.
function optim.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite)
  local what = 'clip_grad_norm_'
  check_nonnegative(what, 'max_norm', max_norm)
  norm_type = norm_type_arg(what, norm_type)
  local grads = grads_of(what, params)
  if #grads == 0 then return 0 end
  local total = total_norm(grads, norm_type)
  if error_if_nonfinite and (total ~= total or total == math.huge) then
    error(string.format('%s: the total norm of order %s of the gradients is non-finite (%s), so it cannot be '
      .. 'clipped; pass error_if_nonfinite = false to clip anyway', what, tostring(norm_type), tostring(total)), 0)
  end
  local coef = max_norm / (total + 1e-6)
  if coef < 1 or coef ~= coef then check(C.ts_scale_(#grads, c_tensors(grads), coef)) end
  free_all(grads)
  return total
end

-- ---- parameter groups: weight decay and layer-wise lr decay -------------------------------------------
local function name_set(what, list)
  local set = {}
  if list == nil then return set end
  if type(list) ~= 'table' then
    error(string.format('%s: the skip list must be a table of names, got %s', what, type(list)), 0)
  end
  for k, v in each(list) do
    if type(k) == 'number' then set[v] = true elseif v then set[k] = true end
  end
  return set
end

local function named_parameters(what, model)
  if type(model) ~= 'table' or type(model.named_parameters) ~= 'function' then
    error(what .. ': expected a module with named_parameters()', 0)
  end
  local out = {}
  for name, p in model:named_parameters() do out[#out + 1] = { name, p } end
  return out
end

-- timm's rule: no weight decay for 1-D (and 0-D) parameters, biases and names in skip_list.
-- Returns {{params = no_decay, weight_decay = 0}, {params = decay, weight_decay = weight_decay}};
-- frozen parameters are left out.
function optim.param_groups_weight_decay(model, weight_decay, skip_list)
  local what = 'param_groups_weight_decay'
  weight_decay = check_nonnegative(what, 'weight_decay', weight_decay or 1e-5)
  local skip = name_set(what, skip_list)
  local decay, no_decay = { params = {}, param_names = {}, weight_decay = weight_decay },
    { params = {}, param_names = {}, weight_decay = 0 }
  for _, e in ipairs(named_parameters(what, model)) do
    local name, p = e[1], e[2]
    if p.requires_grad then
      local g = (p:dim() <= 1 or name:sub(-5) == '.bias' or name == 'bias' or skip[name]) and no_decay or decay
      g.params[#g.params + 1] = p
      g.param_names[#g.param_names + 1] = name
    end
  end
  return { no_decay, decay }
end

-- BEiT/MAE's get_layer_id_for_vit: cls_token, pos_embed and patch_embed.* → 0, blocks.i.* → i+1,
-- everything else (final norm, head) → num_layers. UM-MAE's Swin and PVT keep their blocks in one
-- flat list (blocks.i, a stage's patch merging inside its first block), so this rule serves them
-- too, with num_layers = total blocks + 1.
function optim.layer_id_for_vit(name, num_layers)
  if name == 'cls_token' or name == 'pos_embed' or name:match('^patch_embed') then return 0 end
  local i = name:match('^blocks%.(%d+)')
  if i then return tonumber(i) + 1 end
  return num_layers
end

-- A stage-aware layer id for hierarchical models named by stage, mapping each block to its global
-- index (blocks of earlier stages first), so layer decay spreads evenly over all blocks:
--   blocks.i.*                          → i + 1 (flat lists, as UM-MAE's Swin/PVT)
--   layers.s.blocks.b.*, stages.s.blocks.b.*  (s, b 0-based) → depths[1..s] summed + b + 1
--   layers.s.<other>.*   (Swin's downsample/norm run after the stage's blocks)  → the stage's last block
--   stages.s.<other>.*   (timm's downsample runs before the stage's blocks)     → the stage's first block
--   blockS.b.* (PVT, S 1-based)         → blocks of stages < S + b + 1
--   patch_embedS / pos_embedS (S > 1)   → the first block of stage S; patch_embed, patch_embed1,
--                                          pos_embed(1), cls_token, mask_token, absolute_pos_embed → 0
--   normS (PVT, S < #depths)            → the last block of stage S
--   anything else (final norm, head)    → num_layers
-- depths lists the blocks per stage; num_layers defaults to sum(depths) + 1.
function optim.layer_id_for_stages(depths)
  local what = 'layer_id_for_stages'
  if type(depths) ~= 'table' or #depths == 0 then error(what .. ': depths must be a non-empty list of block counts', 0) end
  local before = { [0] = 0 } -- before[s]: blocks in stages 1..s
  for s, d in ipairs(depths) do before[s] = before[s - 1] + check_integer(what, 'depths[' .. s .. ']', d, 0) end
  local function stage_of(s, name)
    if s < 1 or s > #depths then
      error(string.format("%s: parameter '%s' names stage %d, but depths lists %d stages", what, name, s - 1, #depths), 0)
    end
    return s
  end
  return function(name, num_layers)
    if name == 'cls_token' or name == 'mask_token' or name == 'absolute_pos_embed' then return 0 end
    local i = name:match('^blocks%.(%d+)')
    if i then return tonumber(i) + 1 end
    local kind, s, rest = name:match('^(%a+)%.(%d+)%.(.*)$')
    if kind == 'layers' or kind == 'stages' then
      s = stage_of(tonumber(s) + 1, name)
      local b = rest:match('^blocks%.(%d+)')
      if b then return before[s - 1] + tonumber(b) + 1 end
      return kind == 'layers' and before[s] or before[s - 1] + 1
    end
    local S, b = name:match('^block(%d+)%.(%d+)')
    if S then return before[stage_of(tonumber(S), name) - 1] + tonumber(b) + 1 end
    local embed, E = name:match('^(%a+_embed)(%d*)')
    if embed == 'patch_embed' or embed == 'pos_embed' then
      local e = tonumber(E) or 1
      return e <= 1 and 0 or before[stage_of(e, name) - 1] + 1
    end
    local N = name:match('^norm(%d+)')
    if N and tonumber(N) < #depths then return before[stage_of(tonumber(N), name)] end
    return num_layers
  end, before[#depths] + 1
end

-- The number of layers when not given: one past the highest blocks.i index, plus one.
local function count_vit_layers(named)
  local top = -1
  for _, e in ipairs(named) do
    local i = e[1]:match('^blocks%.(%d+)')
    if i then top = math.max(top, tonumber(i)) end
  end
  return top + 2
end

local lrd_options = { weight_decay = true, no_weight_decay_list = true, layer_decay = true, num_layers = true,
  layer_id = true, depths = true }

-- MAE/BEiT's param_groups_lrd: one group per (layer id, decay or not), in first-seen order, each
-- {params, param_names, weight_decay, lr_scale = layer_decay ^ (num_layers - layer_id)}.
-- 1-D parameters and names in no_weight_decay_list get no weight decay.
--   opts.layer_id(name, num_layers) → 0..num_layers   (default: layer_id_for_vit, or
--                                      layer_id_for_stages(opts.depths) when depths is given)
--   opts.num_layers                   (default: blocks + 1, counted from the names or depths)
function optim.param_groups_lrd(model, opts)
  local what = 'param_groups_lrd'
  opts = core.options(what, opts, lrd_options)
  local weight_decay = check_nonnegative(what, 'weight_decay', opts.weight_decay or 0.05)
  local layer_decay = check_nonnegative(what, 'layer_decay', opts.layer_decay or 0.75)
  local skip = name_set(what, opts.no_weight_decay_list)
  local named = named_parameters(what, model)
  local layer_id, num_layers = opts.layer_id, opts.num_layers
  if opts.depths ~= nil then
    local fn, n = optim.layer_id_for_stages(opts.depths)
    layer_id, num_layers = layer_id or fn, num_layers or n
  end
  layer_id = layer_id or optim.layer_id_for_vit
  if type(layer_id) ~= 'function' then error(what .. ': layer_id must be a function(name, num_layers)', 0) end
  num_layers = check_integer(what, 'num_layers', num_layers or count_vit_layers(named), 0)
  local groups, by_name = {}, {}
  for _, e in ipairs(named) do
    local name, p = e[1], e[2]
    if p.requires_grad then
      local no_decay = p:dim() == 1 or skip[name]
      local id = layer_id(name, num_layers)
      if not core.is_integer(id) or id < 0 or id > num_layers then
        error(string.format("%s: layer_id gave %s for '%s'; expected an integer in [0, %d]", what, tostring(id), name,
          num_layers), 0)
      end
      local key = string.format('layer_%d_%s', id, no_decay and 'no_decay' or 'decay')
      local g = by_name[key]
      if not g then
        g = { params = {}, param_names = {}, weight_decay = no_decay and 0 or weight_decay,
          lr_scale = layer_decay ^ (num_layers - id) }
        by_name[key] = g
        groups[#groups + 1] = g
      end
      g.params[#g.params + 1] = p
      g.param_names[#g.param_names + 1] = name
    end
  end
  return groups
end

-- ---- learning-rate schedules ------------------------------------------------------------------------
-- Each returns a function of the (fractional) epoch giving the base learning rate.
local lr_schedule = {}
optim.lr_schedule = lr_schedule

local function warmup_args(what, o)
  local base = check_nonnegative(what, 'base_lr', o.base_lr)
  local warmup = check_nonnegative(what, 'warmup_epochs', o.warmup_epochs or 0)
  return base, warmup
end

-- MAE's util/lr_sched: linear warmup from 0 to base_lr over warmup_epochs, then a half-cycle
-- cosine from base_lr down to min_lr at `epochs` (held at min_lr after that).
function lr_schedule.cosine_warmup(o)
  local what = 'lr_schedule.cosine_warmup'
  o = core.options(what, o, { base_lr = true, min_lr = true, warmup_epochs = true, epochs = true })
  local base, warmup = warmup_args(what, o)
  local min_lr = check_nonnegative(what, 'min_lr', o.min_lr or 0)
  local epochs = check_positive(what, 'epochs', o.epochs)
  if epochs <= warmup then
    error(string.format('%s: epochs (%s) must be greater than warmup_epochs (%s)', what, tostring(epochs),
      tostring(warmup)), 0)
  end
  return function(epoch)
    core.check_number(what, 'epoch', epoch)
    if epoch < warmup then return base * epoch / warmup end
    if epoch >= epochs then return min_lr end
    return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))
  end
end

-- Step decay (StepLR / MultiStepLR) after an optional linear warmup:
-- base_lr * gamma ^ (number of boundaries passed), boundaries every step_size epochs or at milestones.
function lr_schedule.step(o)
  local what = 'lr_schedule.step'
  o = core.options(what, o, { base_lr = true, step_size = true, milestones = true, gamma = true, warmup_epochs = true })
  local base, warmup = warmup_args(what, o)
  local gamma = check_nonnegative(what, 'gamma', o.gamma or 0.1)
  if (o.step_size == nil) == (o.milestones == nil) then
    error(what .. ': give exactly one of step_size and milestones', 0)
  end
  local step_size = o.step_size and check_positive(what, 'step_size', o.step_size)
  local milestones = o.milestones
  if milestones then
    if type(milestones) ~= 'table' then error(what .. ': milestones must be a list of epochs', 0) end
    for i, m in ipairs(milestones) do
      check_nonnegative(what, 'milestones[' .. i .. ']', m)
      if i > 1 and m <= milestones[i - 1] then error(what .. ': milestones must be increasing', 0) end
    end
  end
  return function(epoch)
    core.check_number(what, 'epoch', epoch)
    if epoch < warmup then return base * epoch / warmup end
    local passed = 0
    if step_size then
      passed = math.floor(epoch / step_size)
    else
      for _, m in ipairs(milestones) do if epoch >= m then passed = passed + 1 end end
    end
    return base * gamma ^ passed
  end
end

-- A constant learning rate after an optional linear warmup.
function lr_schedule.constant(o)
  local what = 'lr_schedule.constant'
  o = core.options(what, o, { base_lr = true, warmup_epochs = true })
  local base, warmup = warmup_args(what, o)
  return function(epoch)
    core.check_number(what, 'epoch', epoch)
    if epoch < warmup then return base * epoch / warmup end
    return base
  end
end

-- MAE's adjust_learning_rate: every group's lr = schedule(epoch) * (group.lr_scale or 1).
-- Returns the unscaled learning rate.
function optim.adjust_learning_rate(optimizer, epoch, schedule)
  local what = 'adjust_learning_rate'
  if type(optimizer) ~= 'table' or type(optimizer.param_groups) ~= 'table' then
    error(what .. ': expected an optimizer', 0)
  end
  if type(schedule) ~= 'function' then error(what .. ': schedule must be a function of the epoch', 0) end
  local lr = schedule(core.check_number(what, 'epoch', epoch))
  check_nonnegative(what, 'the scheduled lr', lr)
  for _, g in ipairs(optimizer.param_groups) do g.lr = lr * (g.lr_scale or 1) end
  return lr
end

-- ---- loss scaling for float16 -----------------------------------------------------------------------
-- torch.cuda.amp.GradScaler: float16 gradients underflow, so the loss is multiplied by a scale
-- before backward and the gradients divided by it before the step; a step whose gradients hold
-- Inf/NaN is skipped and the scale backs off, and after growth_interval clean steps it grows.
--   local scaler = T.optim.GradScaler{init_scale = 2^16, growth_factor = 2, backoff_factor = 0.5,
--                                     growth_interval = 2000, enabled = true}
--   scaler:scale(loss):backward()
--   scaler:unscale_(opt)             (optional: before clipping) → whether the gradients hold Inf/NaN
--   scaler:step(opt)                 → whether the optimizer stepped
--   scaler:update()
-- A disabled scaler passes everything through (scale 1, every step taken). The scale is a power of
-- two by default, so scaling and unscaling float32 gradients is exact.
local GradScaler = {}
GradScaler.__index = GradScaler

function optim.GradScaler(opts)
  local what = 'GradScaler'
  opts = core.options(what, opts, { 'init_scale', 'growth_factor', 'backoff_factor', 'growth_interval', 'enabled' })
  local self = setmetatable({ enabled = check_boolean(what, 'enabled', opts.enabled, true), growth_tracker = 0,
    per_optimizer = setmetatable({}, { __mode = 'k' }) }, GradScaler) -- optimizer → {found_inf, stepped}
  self:set_factors(what, check_positive(what, 'init_scale', opts.init_scale, 2 ^ 16), opts.growth_factor or 2,
    opts.backoff_factor or 0.5, opts.growth_interval or 2000)
  return self
end

-- The scale and its rules, checked (the constructor's options, or a loaded state).
function GradScaler:set_factors(what, scale, growth_factor, backoff_factor, growth_interval)
  self.scale_value = check_positive(what, 'scale', scale)
  self.growth_factor = check_positive(what, 'growth_factor', growth_factor)
  self.backoff_factor = check_positive(what, 'backoff_factor', backoff_factor)
  self.growth_interval = check_integer(what, 'growth_interval', growth_interval, 1)
  if growth_factor <= 1 then error(what .. ': growth_factor must be > 1, got ' .. growth_factor, 0) end
  if backoff_factor >= 1 then error(what .. ': backoff_factor must be < 1, got ' .. backoff_factor, 0) end
end

function GradScaler:is_enabled() return self.enabled end
function GradScaler:get_scale() return self.enabled and self.scale_value or 1 end

-- A 16-bit loss is widened to float32 first (PyTorch's float32 scale tensor promotes a 0-d one):
-- a float16 loss above 1 times 2^16 would overflow.
function GradScaler:scale(loss)
  if not core.is_tensor(loss) then error('GradScaler:scale: expected a tensor, got ' .. type(loss), 0) end
  if not self.enabled then return loss end
  if loss.dtype == 'float16' or loss.dtype == 'bfloat16' then loss = loss:float() end
  return loss * self.scale_value
end

local function check_optimizer(what, optimizer)
  if type(optimizer) ~= 'table' or type(optimizer.step) ~= 'function' or type(optimizer.param_groups) ~= 'table' then
    error(what .. ': expected an optimizer', 0)
  end
end

local function optimizer_params(optimizer)
  local out = {}
  for _, g in ipairs(optimizer.param_groups) do
    for _, p in ipairs(g.params) do out[#out + 1] = p end
  end
  return out
end

-- Divides the optimizer's gradients by the scale, once per update(); returns whether any holds
-- Inf/NaN (their largest magnitude is then Inf or NaN). float16 gradients are refused, as PyTorch
-- does: the scaler is for float32 master weights under float16 autocast.
function GradScaler:unscale_(optimizer)
  local what = 'GradScaler:unscale_'
  check_optimizer(what, optimizer)
  if not self.enabled then return false end
  if self.per_optimizer[optimizer] then
    error(what .. ': already called on this optimizer since the last update()', 0)
  end
  local grads = grads_of(what, optimizer_params(optimizer))
  for _, g in ipairs(grads) do
    if g.dtype == 'float16' then
      free_all(grads)
      error(what .. ': attempting to unscale float16 gradients; keep float32 parameters and use autocast', 0)
    end
  end
  local state = { found_inf = true } -- until the check below has run: a failed check skips the step
  self.per_optimizer[optimizer] = state
  if #grads > 0 then
    check(C.ts_scale_(#grads, c_tensors(grads), 1 / self.scale_value))
    local largest = total_norm(grads, math.huge)
    free_all(grads)
    state.found_inf = largest ~= largest or largest == math.huge
  else
    state.found_inf = false
  end
  return state.found_inf
end

-- Unscales (unless unscale_ did), then steps unless the gradients hold Inf/NaN; once per update().
function GradScaler:step(optimizer)
  local what = 'GradScaler:step'
  check_optimizer(what, optimizer)
  if not self.enabled then
    optimizer:step()
    return true
  end
  if not self.per_optimizer[optimizer] then self:unscale_(optimizer) end
  local state = self.per_optimizer[optimizer]
  if state.stepped then error(what .. ': already called on this optimizer since the last update()', 0) end
  state.stepped = true
  if state.found_inf then return false end
  optimizer:step()
  return true
end

-- Backs off after a step with Inf/NaN gradients, grows after growth_interval clean ones.
function GradScaler:update()
  if not self.enabled then return end
  local found_inf, seen = false, false
  for _, state in each(self.per_optimizer) do
    seen = true
    found_inf = found_inf or state.found_inf
  end
  if not seen then error('GradScaler:update: no optimizer was unscaled or stepped since the last update()', 0) end
  if found_inf then
    self.scale_value, self.growth_tracker = self.scale_value * self.backoff_factor, 0
  else
    self.growth_tracker = self.growth_tracker + 1
    if self.growth_tracker == self.growth_interval then
      self.scale_value, self.growth_tracker = self.scale_value * self.growth_factor, 0
    end
  end
  self.per_optimizer = setmetatable({}, { __mode = 'k' })
end

-- PyTorch's keys ({} when disabled).
function GradScaler:state_dict()
  if not self.enabled then return {} end
  return { scale = self.scale_value, growth_factor = self.growth_factor, backoff_factor = self.backoff_factor,
    growth_interval = self.growth_interval, _growth_tracker = self.growth_tracker }
end

function GradScaler:load_state_dict(sd)
  local what = 'GradScaler:load_state_dict'
  if type(sd) ~= 'table' then error(what .. ': expected a table, got ' .. type(sd), 0) end
  if not self.enabled then return end
  if next(sd) == nil then error(what .. ': the state is empty (saved from a disabled scaler)', 0) end
  self:set_factors(what, sd.scale, sd.growth_factor, sd.backoff_factor, sd.growth_interval)
  self.growth_tracker = check_integer(what, '_growth_tracker', sd._growth_tracker, 0)
end

-- ---- gradient accumulation --------------------------------------------------------------------------
-- MAE's pattern for an effective batch of accum_iter micro-batches:
--   local acc = T.optim.Accumulator(opt, accum_iter[, {max_norm = 1.0, norm_type = 2, scaler = GradScaler}])
--   for it, batch in ... do
--     if acc:at_window_start() then T.optim.adjust_learning_rate(opt, epoch + it / n, sched) end
--     local stepped, grad_norm = acc:backward(loss_of(batch))
--   end
-- backward() back-propagates loss / accum_iter (gradients add up to the full batch's mean) and, on
-- every accum_iter-th call, clips (when max_norm is set), steps and zeroes the gradients. With
-- opts.scaler (a GradScaler, MAE's NativeScaler pattern) the loss is scaled for backward and the
-- gradients unscaled before clipping and the step, which is skipped when they hold Inf/NaN; the
-- accumulator calls the scaler's update() itself.
local Accumulator = {}
Accumulator.__index = Accumulator

function optim.Accumulator(optimizer, accum_iter, opts)
  local what = 'Accumulator'
  check_optimizer(what, optimizer)
  check_integer(what, 'accum_iter', accum_iter, 1)
  opts = core.options(what, opts, { max_norm = true, norm_type = true, scaler = true })
  if opts.max_norm ~= nil then check_nonnegative(what, 'max_norm', opts.max_norm) end
  if opts.scaler ~= nil and getmetatable(opts.scaler) ~= GradScaler then
    error(what .. ': scaler must be a T.optim.GradScaler, got ' .. core.describe(opts.scaler), 0)
  end
  return setmetatable({ optimizer = optimizer, accum_iter = accum_iter, count = 0, max_norm = opts.max_norm,
    norm_type = norm_type_arg(what, opts.norm_type), scaler = opts.scaler }, Accumulator)
end

function Accumulator:at_window_start() return self.count == 0 end

-- Returns whether the optimizer stepped (not at a window's end, nor when the scaler skips a step
-- with Inf/NaN gradients), and the gradient norm before clipping when max_norm is set.
function Accumulator:backward(loss)
  if not core.is_tensor(loss) then error('Accumulator:backward: expected a loss tensor, got ' .. type(loss), 0) end
  local scaled = self.accum_iter > 1 and loss / self.accum_iter or loss
  local scaler = self.scaler
  if scaler then scaled = scaler:scale(scaled) end
  scaled:backward()
  self.count = self.count + 1
  if self.count < self.accum_iter then return false end
  local norm, stepped
  if scaler then scaler:unscale_(self.optimizer) end -- clipping sees the true gradients
  if self.max_norm then norm = optim.clip_grad_norm_(optimizer_params(self.optimizer), self.max_norm, self.norm_type) end
  if scaler then
    stepped = scaler:step(self.optimizer)
    scaler:update()
  else
    self.optimizer:step()
    stepped = true
  end
  self.optimizer:zero_grad()
  self.count = 0
  return stepped, norm
end

-- Drops a partial window: zeroes the gradients and restarts the count (MAE zeroes at epoch start).
function Accumulator:reset()
  self.optimizer:zero_grad()
  self.count = 0
end

return optim
