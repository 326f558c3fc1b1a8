-- tessera.autograd — gradients: requires_grad, backward, .grad, detach, no_grad.
-- The tape lives in C (runtime/autograd.c); this module only exposes it.
local core = require 'tessera.core'
local C, T, Tensor = core.C, core.T, core.Tensor
local handle, check, wrap = core.handle, core.check, core.wrap
local props, setters = core.properties, core.setters

props.requires_grad = function(t) return C.ts_requires_grad(handle(t, 'requires_grad')) ~= 0 end
props.is_leaf = function(t) return C.ts_is_leaf(handle(t, 'is_leaf')) ~= 0 end
props.grad_fn = function(t)
  local name = core.ffi.string(C.ts_grad_fn_name(handle(t, 'grad_fn')))
  return name ~= '' and name or nil
end
props.grad = function(t)
  local g = C.ts_grad(handle(t, 'grad'))
  if g == nil then return nil end
  return wrap(g)
end
setters.grad = function(t, g)
  check(C.ts_set_grad(handle(t, 'grad'), g ~= nil and handle(g, 'grad') or nil))
end
setters.requires_grad = function(t, v) Tensor.requires_grad_(t, v) end

function Tensor.requires_grad_(t, requires)
  if requires == nil then requires = true end
  check(C.ts_set_requires_grad(handle(t, 'requires_grad_'), requires and 1 or 0))
  return t
end

function Tensor.detach(t) return wrap(C.ts_detach(handle(t, 'detach'))) end

-- t:backward([grad][, {retain_graph = true}])
function Tensor.backward(t, grad, opts)
  if type(grad) == 'table' and not core.is_tensor(grad) then grad, opts = nil, grad end
  opts = opts or {}
  check(C.ts_backward(handle(t, 'backward'), grad and handle(grad, 'backward') or nil,
    opts.retain_graph and 1 or 0))
end

-- Runs fn(...) with grad mode set to `enabled`, restoring the previous mode even on error.
local function with_grad_mode(enabled, fn, ...)
  return core.restore_after(C.ts_set_grad_enabled, C.ts_set_grad_enabled(enabled and 1 or 0), pcall(fn, ...))
end

function T.no_grad(fn, ...) return with_grad_mode(false, fn, ...) end
function T.enable_grad(fn, ...) return with_grad_mode(true, fn, ...) end
function T.is_grad_enabled() return C.ts_is_grad_enabled() ~= 0 end
function T.set_grad_enabled(enabled) return C.ts_set_grad_enabled(enabled and 1 or 0) ~= 0 end

-- ---- gradient checking ---------------------------------------------------------------------------
-- T.gradcheck(fn, inputs, opts) compares the backward pass with central finite differences.
-- inputs: a list of float64 tensors (those requiring grad are checked; any strides). fn returns a
-- tensor; its output is projected on fixed pseudo-random weights W, so one backward of sum(W*out)
-- checks a vector-Jacobian product against (f(x+eps) - f(x-eps)) / 2eps for every input element.
-- Passes when |analytical - numerical| <= atol + rtol * |numerical| everywhere; otherwise raises
-- an error naming the op, the input, the worst element and both values.
-- opts: name, eps (1e-6), atol (1e-5), rtol (1e-3).
local function projection_weights(out)
  local n, x, w = out:numel(), 12345, {}
  for i = 1, n do
    x = (x * 1103515245 + 12345) % 2147483648
    w[i] = 0.5 + x / 2147483648 -- in [0.5, 1.5): no cancellation between elements
  end
  return T.tensor(w, { dtype = 'float64' }):view(out.shape)
end

local function unravel(k, shape)
  local idx = {}
  for d = #shape, 1, -1 do
    idx[d] = k % shape[d]
    k = math.floor(k / shape[d])
  end
  return idx
end

local function element(t, idx)
  local v = t
  for d = 1, #idx do v = v:select(0, idx[d]) end
  return v
end

function T.gradcheck(fn, inputs, opts)
  opts = opts or {}
  local name, eps = opts.name or 'gradcheck', opts.eps or 1e-6
  local atol, rtol = opts.atol or 1e-5, opts.rtol or 1e-3
  for i, x in ipairs(inputs) do
    if core.is_tensor(x) and x.requires_grad and x.dtype ~= 'float64' then
      error(string.format('%s: input %d is %s; gradcheck needs float64 inputs', name, i, x.dtype), 0)
    end
  end
  local out = fn(unpack(inputs))
  local w = projection_weights(out)
  local function objective()
    return T.no_grad(function() return ((fn(unpack(inputs)) * w):sum()):item() end)
  end
  for _, x in ipairs(inputs) do
    if core.is_tensor(x) and x.requires_grad then x.grad = nil end
  end
  ;(out * w):sum():backward()
  local worst = { excess = -math.huge }
  for i, x in ipairs(inputs) do
    if core.is_tensor(x) and x.requires_grad then
      local shape = core.shape_of(x.h)
      local flat_analytical = x.grad and x.grad:reshape(-1):totable() or {}
      for k = 0, x:numel() - 1 do
        local idx = unravel(k, shape)
        local cell = T.no_grad(element, x, idx)
        local orig = cell:item()
        T.no_grad(function() cell:fill_(orig + eps) end)
        local plus = objective()
        T.no_grad(function() cell:fill_(orig - eps) end)
        local minus = objective()
        T.no_grad(function() cell:fill_(orig) end)
        local numerical = (plus - minus) / (2 * eps)
        local a = flat_analytical[k + 1] or 0
        local excess = math.abs(a - numerical) - (atol + rtol * math.abs(numerical))
        if excess > worst.excess then
          worst = { excess = excess, input = i, index = idx, analytical = a, numerical = numerical }
        end
      end
    end
  end
  if worst.excess > 0 then
    error(string.format('%s: gradient mismatch at input %d element [%s]: analytical %.10g vs numerical %.10g '
      .. '(tolerance atol %g + rtol %g)', name, worst.input, table.concat(worst.index, ','), worst.analytical,
      worst.numerical, atol, rtol), 0)
  end
  return true
end

return T
