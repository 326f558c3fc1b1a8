-- cuda_optim_spec.lua — the multi-tensor optimizer kernels on CUDA against the CPU: AdamW and SGD
-- (momentum, dampening, Nesterov, weight decay) trajectories over several steps, with parameter
-- groups, every float dtype (float16/bfloat16 against float32 state), more tensors than one launch
-- takes, tensors larger than one block's chunk and empty ones; the total gradient norm (1, 2, 3,
-- inf, NaN) and clip_grad_norm_. The updates are written without fused multiply-adds, so they
-- should match the CPU to the last bit (the error table shows it). Pending without a GPU.
local each = require 'tessera.each'
local T = require 'tessera'
local CS = require 'cuda_support'

-- Parameter shapes and dtypes: 30 small float32 tensors (more than one launch holds), one larger
-- than a block's chunk, an empty one, and the other dtypes.
local function param_specs()
  local specs = {
    { { 4, 5 }, 'float32' }, { { 3, 3, 3 }, 'float64' }, { { 6, 2 }, 'float16' }, { { 9 }, 'bfloat16' },
    { { 40000 }, 'float32' }, { { 0 }, 'float32' }, { { 5, 7 }, 'float16' }, { { 33 }, 'float64' },
  }
  for i = 1, 30 do specs[#specs + 1] = { { i % 5 + 1 }, 'float32' } end
  return specs
end

local function tensor_of(dtype, seed, shape, lo, hi)
  for _, s in ipairs(shape) do
    if s == 0 then return T.zeros(shape, { dtype = dtype }) end
  end
  return CS.rand(dtype, seed, shape, lo, hi)
end

-- The same parameters (leaves that require grad) on the cpu and on the gpu.
local function make_params(seed)
  local cpu, gpu = {}, {}
  for i, spec in ipairs(param_specs()) do
    local c = tensor_of(spec[2], seed + i, spec[1])
    cpu[i] = c:clone():requires_grad_(true)
    gpu[i] = c:cuda():requires_grad_(true)
  end
  return cpu, gpu
end

-- Step `step`'s gradients, the same on both devices.
local function set_grads(cpu, gpu, step)
  for i, p in ipairs(cpu) do
    local g = tensor_of(p.dtype, 1000 * step + i, p.shape, -2, 2)
    p.grad = g
    gpu[i].grad = g:cuda()
  end
end

-- Near the CPU's last bit: float32/float64 should be identical; 16-bit params one rounding apart
-- at most.
local function tol(dtype)
  if dtype == 'float16' then return { rtol = 1e-3, atol = 1e-4 } end
  if dtype == 'bfloat16' then return { rtol = 8e-3, atol = 8e-4 } end
  if dtype == 'float64' then return { rtol = 1e-14, atol = 1e-15 } end
  return { rtol = 1e-6, atol = 1e-7 }
end

local function compare(case, cpu, gpu, cpu_opt, gpu_opt, state_keys)
  for i, p in ipairs(cpu) do
    CS.check(case, gpu[i]:detach(), p:detach(), tol(p.dtype))
    for _, key in ipairs(state_keys or {}) do
      local sc, sg = cpu_opt.state[p], gpu_opt.state[gpu[i]]
      if sc and sc[key] and type(sc[key]) ~= 'number' then
        CS.check(case .. ' (' .. key .. ')', sg[key], sc[key], tol(sc[key].dtype))
      end
    end
  end
end

local function run_trajectory(case, make_optimizer, steps, state_keys)
  local cpu, gpu = make_params(7)
  local oc, og = make_optimizer(cpu), make_optimizer(gpu)
  for step = 1, steps do
    set_grads(cpu, gpu, step)
    oc:step()
    og:step()
    compare(case, cpu, gpu, oc, og, state_keys)
  end
end

-- Two groups: the first half of the parameters with their own lr and weight decay.
local function groups(params, first, rest)
  local a, b = { params = {} }, { params = {} }
  for k, v in each(first) do a[k] = v end
  for k, v in each(rest) do b[k] = v end
  for i, p in ipairs(params) do table.insert(i <= #params / 2 and a.params or b.params, p) end
  return { a, b }
end

describe('cuda optimizers match the cpu', function()
  teardown(function() CS.report('optimizers') end)

  CS.it('AdamW trajectories, one group and two', function()
    run_trajectory('adamw', function(ps) return T.optim.AdamW(ps, { lr = 1e-2, weight_decay = 0.05 }) end, 6,
      { 'exp_avg', 'exp_avg_sq' })
    run_trajectory('adamw (groups)', function(ps)
      return T.optim.AdamW(groups(ps, { lr = 3e-3, weight_decay = 0 }, { lr = 2e-2 }), { betas = { 0.8, 0.95 }, eps = 1e-6 })
    end, 6, { 'exp_avg', 'exp_avg_sq' })
  end)

  CS.it('SGD trajectories: plain, momentum with dampening, Nesterov, weight decay', function()
    run_trajectory('sgd', function(ps) return T.optim.SGD(ps, { lr = 0.1 }) end, 4)
    run_trajectory('sgd (momentum)', function(ps)
      return T.optim.SGD(ps, { lr = 0.05, momentum = 0.9, dampening = 0.1, weight_decay = 1e-2 })
    end, 5, { 'momentum_buffer' })
    run_trajectory('sgd (nesterov)', function(ps)
      return T.optim.SGD(groups(ps, { lr = 0.02 }, { lr = 0.1, weight_decay = 0.1 }), { momentum = 0.8, nesterov = true })
    end, 5, { 'momentum_buffer' })
  end)

  CS.it('grad_norm of orders 1, 2, 3 and inf over mixed dtypes; NaN and inf gradients', function()
    local cpu, gpu = make_params(11)
    set_grads(cpu, gpu, 1)
    for _, p in ipairs { 1, 2, 3, math.huge, 0.5 } do
      local want, got = T.optim.grad_norm(cpu, p), T.optim.grad_norm(gpu, p)
      assert(math.abs(got - want) <= 1e-12 * math.abs(want),
        string.format('grad_norm(%s): %.17g on cuda, %.17g on cpu', tostring(p), got, want))
    end
    cpu[2].grad[{ 1, 1, 1 }] = 0 / 0
    gpu[2].grad[{ 1, 1, 1 }] = 0 / 0
    for _, p in ipairs { 2, math.huge } do
      local got = T.optim.grad_norm(gpu, p)
      assert(got ~= got, 'a NaN gradient makes the norm NaN, got ' .. tostring(got))
    end
    cpu[2].grad[{ 1, 1, 1 }] = math.huge
    gpu[2].grad[{ 1, 1, 1 }] = math.huge
    assert.equals(math.huge, T.optim.grad_norm(gpu, math.huge))
    assert.equals(math.huge, T.optim.grad_norm(gpu, 2))
  end)

  CS.it('grad_norm is bit-identical run to run', function()
    local _, gpu = make_params(13)
    set_grads(gpu, gpu, 3)
    local first = T.optim.grad_norm(gpu, 2)
    for _ = 1, 3 do assert.equals(first, T.optim.grad_norm(gpu, 2)) end
  end)

  CS.it('clip_grad_norm_ scales every gradient like the cpu', function()
    local cpu, gpu = make_params(17)
    set_grads(cpu, gpu, 2)
    local want, got = T.optim.clip_grad_norm_(cpu, 0.5), T.optim.clip_grad_norm_(gpu, 0.5)
    assert(math.abs(got - want) <= 1e-12 * want, string.format('total norm %.17g on cuda, %.17g on cpu', got, want))
    for i, p in ipairs(cpu) do CS.check('clip_grad_norm_', gpu[i].grad, p.grad, tol(p.dtype)) end
  end)
end)
