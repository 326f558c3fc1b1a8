-- checkpoint_spec.lua — tessera.checkpoint: round trips of every section, strictness about missing
-- pieces, tolerance of unknown ones, clear errors for foreign or corrupt files, and crash safety
-- (a writer killed with SIGKILL mid-save never leaves a torn file under the final name).
local each = require 'tessera.each'
local T = require 'tessera'
local S = require 'support'
local checkpoint = require 'tessera.checkpoint'
local TESSERA = require 'fixtures.tessera_bin'

local tmpdir = S.tmpdir

local function rmdir(dir) os.execute("rm -rf '" .. dir .. "'") end

local function same_bits(a, b, what)
  assert.are.same(a.shape, b.shape, what)
  assert.is_true(a:eq(b):all():item(), what .. ': values differ')
end

-- A model and AdamW after two steps, so that the optimizer has state.
local function trained(seed)
  T.manual_seed(seed)
  local model = T.nn.Sequential(T.nn.Linear(3, 5), T.nn.Tanh(), T.nn.Linear(5, 2))
  local opt = T.optim.AdamW(model:parameters(), { lr = 0.01 })
  for _ = 1, 2 do
    local loss = model(T.randn({ 4, 3 })):pow(2):mean()
    opt:zero_grad()
    loss:backward()
    opt:step()
  end
  return model, opt
end

local Loader = {}
Loader.__index = Loader
function Loader:state() return { epoch = self.epoch, position = self.position, order = { 3, 1, 2 } } end
function Loader:load_state(s) self.epoch, self.position, self.order = s.epoch, s.position, s.order end
local function loader(epoch, position) return setmetatable({ epoch = epoch, position = position }, Loader) end

-- Rewrites a checkpoint file through T.load/T.save with an edit of its tensors and metadata.
local function rewrite(src, dst, edit)
  local tensors, meta = T.load(src)
  local copy_t, copy_m = {}, {}
  for k, v in each(tensors) do copy_t[k] = v:clone() end
  for k, v in each(meta) do copy_m[k] = v end
  edit(copy_t, copy_m)
  T.save(dst, copy_t, { metadata = copy_m })
end

describe('checkpoint', function()
  local dir
  before_each(function() dir = tmpdir() end)
  after_each(function() rmdir(dir) end)

  it('round-trips model, optimizer, loader, generators, position, config and extra', function()
    local model, opt = trained(1)
    local gen = T.Generator(77)
    T.randn({ 5 }, { generator = gen })
    T.manual_seed(123)
    T.randn({ 7 })
    local path = dir .. '/c.safetensors'
    checkpoint.save(path, { model = model, optimizer = opt, loader = loader(2, 5), generators = { mask = gen },
      epoch = 2, iter = 5, step = 21, iters = 8, config = { lr = 0.01, dims = { 3, 5 }, name = 'x' },
      extra = { best = 0.25, history = { 1, 2, 3 }, ema = { w = T.arange(4):double() } }, metadata = { note = 'hi' } })
    local expect_default = T.randn({ 3 })
    local expect_mask = T.randn({ 3 }, { generator = gen })

    local model2, opt2 = trained(2)
    local l2, gen2 = loader(0, 0), T.Generator(1)
    T.manual_seed(999)
    local b = checkpoint.restore(path, { model = model2, optimizer = opt2, loader = l2, generators = { mask = gen2 } })

    for name, t in each(model:state_dict()) do same_bits(model2:state_dict()[name], t, name) end
    local s1, s2 = opt:state_dict(), opt2:state_dict()
    for i, entry in each(s1.state) do
      same_bits(s2.state[i].exp_avg, entry.exp_avg, 'exp_avg ' .. i)
      same_bits(s2.state[i].exp_avg_sq, entry.exp_avg_sq, 'exp_avg_sq ' .. i)
      assert.are.equal(entry.step, s2.state[i].step)
    end
    assert.are.same({ epoch = 2, position = 5, order = { 3, 1, 2 } }, { epoch = l2.epoch, position = l2.position, order = l2.order })
    same_bits(T.randn({ 3 }), expect_default, 'default generator')
    same_bits(T.randn({ 3 }, { generator = gen2 }), expect_mask, 'mask generator')
    assert.are.same({ epoch = 2, iter = 5, step = 21, iters = 8 }, b.position)
    assert.are.same({ lr = 0.01, dims = { 3, 5 }, name = 'x' }, b.config)
    assert.are.equal(0.25, b.extra.best)
    assert.are.same({ 1, 2, 3 }, b.extra.history)
    same_bits(b.extra.ema.w, T.arange(4):double(), 'extra tensor')
    assert.are.equal('hi', b.metadata.note)
    assert.are.equal('AdamW', b.optimizer_class)
  end)

  it('keeps 64-bit generator states exact', function()
    local g = T.Generator(0xFFFFFFFFFFFFFFF1ULL)
    T.rand({ 1000 }, { generator = g })
    local path = dir .. '/g.safetensors'
    checkpoint.save(path, { model = { w = T.zeros(1) }, generators = { g = g } })
    local expect = T.rand({ 4 }, { generator = g })
    local g2 = T.Generator(5)
    checkpoint.restore(path, { generators = { g = g2 }, rng = false })
    assert.are.same(g:get_state().seed, g2:get_state().seed)
    same_bits(T.rand({ 4 }, { generator = g2 }), expect, 'generator stream')
  end)

  it('ignores sections, tensors and metadata it does not know', function()
    local path, edited = dir .. '/c.safetensors', dir .. '/e.safetensors'
    local model = trained(3)
    checkpoint.save(path, { model = model, epoch = 1 })
    rewrite(path, edited, function(t, m)
      t['ema.0.weight'] = T.ones(2)
      m.future_section = '{"x": 1}'
    end)
    local model2 = trained(4)
    local b = checkpoint.restore(edited, { model = model2 })
    same_bits(model2:state_dict()['0.weight'], model:state_dict()['0.weight'], 'weights')
    assert.are.equal(1, b.position.epoch)
    assert.is_nil(b.optimizer)
  end)

  it('refuses files missing a tensor, a section or their format tag', function()
    local model, opt = trained(5)
    local path = dir .. '/c.safetensors'
    checkpoint.save(path, { model = model, optimizer = opt })
    local bad = dir .. '/bad.safetensors'
    rewrite(path, bad, function(t) t['model.2.bias'] = nil end)
    S.assert_error(function() checkpoint.load(bad) end, bad, 'missing tensor model.2.bias')
    rewrite(path, bad, function(t) t['optimizer.state.0.exp_avg'] = nil end)
    S.assert_error(function() checkpoint.load(bad) end, 'missing tensor optimizer.state.0.exp_avg')
    rewrite(path, bad, function(_, m) m.position = nil end)
    S.assert_error(function() checkpoint.load(bad) end, 'incomplete', "'position'")
    rewrite(path, bad, function(_, m) m.rng = '{not json' end)
    S.assert_error(function() checkpoint.load(bad) end, "metadata 'rng' is not valid JSON")
    rewrite(path, bad, function(_, m) m.format_version = '7' end)
    S.assert_error(function() checkpoint.load(bad) end, 'format version 7', 'reads versions up to 1')
    local weights_only = checkpoint.save(dir .. '/w.safetensors', { model = model })
    S.assert_error(function() checkpoint.restore(weights_only, { optimizer = opt }) end, 'holds no optimizer state')
    S.assert_error(function() checkpoint.restore(weights_only, { loader = loader(0, 0) }) end, 'holds no loader state')
    S.assert_error(function() checkpoint.restore(weights_only, { generators = { mask = T.Generator(1) } }) end,
      "no state for generator 'mask'")
  end)

  it('names what does not fit when restoring', function()
    local model, opt = trained(6)
    local path = dir .. '/c.safetensors'
    checkpoint.save(path, { model = model, optimizer = opt })
    local other = T.nn.Sequential(T.nn.Linear(3, 6), T.nn.Tanh(), T.nn.Linear(6, 2))
    S.assert_error(function() checkpoint.restore(path, { model = other }) end, 'does not fit the model', '0.weight')
    local sgd = T.optim.SGD(model:parameters(), { lr = 0.1 })
    S.assert_error(function() checkpoint.restore(path, { optimizer = sgd }) end, 'holds AdamW state', 'SGD')
  end)

  it('gives clear errors for foreign, corrupt and missing files', function()
    local plain = dir .. '/plain.safetensors'
    T.save(plain, { w = T.ones(2) })
    S.assert_error(function() checkpoint.load(plain) end, 'not a tessera checkpoint', 'no format tag')
    local garbage = dir .. '/garbage.safetensors'
    local f = io.open(garbage, 'wb'); f:write(string.rep('x', 100)); f:close()
    S.assert_error(function() checkpoint.load(garbage) end, 'cannot load ' .. garbage)
    local path = dir .. '/c.safetensors'
    checkpoint.save(path, { model = { w = T.ones(1000) } })
    f = io.open(path, 'rb'); local bytes = f:read('*a'); f:close()
    local torn = dir .. '/torn.safetensors'
    f = io.open(torn, 'wb'); f:write(bytes:sub(1, #bytes - 100)); f:close()
    S.assert_error(function() checkpoint.load(torn) end, 'cannot load ' .. torn)
    S.assert_error(function() checkpoint.load(dir .. '/none.safetensors') end, 'cannot load', 'none.safetensors')
    S.assert_error(function() checkpoint.save(path, { model = { w = T.ones(1) }, bogus = 1 }) end, "unknown option 'bogus'")
    S.assert_error(function() checkpoint.save(path, { model = { w = T.ones(1) }, metadata = { rng = 'x' } }) end,
      "'rng' is reserved")
    S.assert_error(function() checkpoint.save(path, { model = { w = T.ones(1) }, epoch = -1 }) end,
      'epoch must be a non-negative integer')
    S.assert_error(function() checkpoint.save(path, { loader = { f = print } }) end, 'loader state cannot be stored as JSON')
  end)

  it('removes temporary files that dead writers left behind, and only those', function()
    local path = dir .. '/c.safetensors'
    local dead, alive = path .. '.tmp.999999999', path .. '.tmp.1'
    for _, name in ipairs { dead, alive } do local f = io.open(name, 'wb'); f:write('partial'); f:close() end
    checkpoint.save(path, { model = { w = T.ones(1) } })
    assert.is_nil(io.open(dead, 'rb'))
    local f = io.open(alive, 'rb') -- pid 1 is alive: never touched
    assert.is_not_nil(f)
    f:close()
  end)

  it('survives a writer killed with SIGKILL at random moments', function()
    local path = dir .. '/crash.safetensors'
    local elements = 6 * 1024 * 1024 -- 24 MB per save: a kill often lands mid-write
    local function check_whole()
      local b = checkpoint.load(path)
      local k = b.extra.k
      assert.are.equal(k, b.position.step)
      assert.is_true(b.model.big:eq(k):all():item(), 'big tensor is not all ' .. k)
      assert.is_true(b.model.small:eq(k):all():item() and b.extra.copy:eq(k):all():item(), 'small tensor is not all ' .. k)
      return k
    end
    checkpoint.save(path, { model = { big = T.zeros(elements), small = T.zeros(3, 5):double() }, step = 0,
      extra = { k = 0, copy = T.zeros(3, 5):double() } })
    math.randomseed(os.time())
    local last, torn = check_whole(), 0
    for round = 1, 4 do
      local first = round * 1000
      local out = dir .. '/writer.out'
      local pid = io.popen(string.format("'%s' run tests/fixtures/checkpoint_writer.lua '%s' %d %d > '%s' 2>&1 & echo $!",
        TESSERA, path, elements, first, out)):read('*l')
      -- wait for its first save, then kill it at a random moment of the following ones
      local deadline = os.time() + 30
      repeat
        os.execute('sleep 0.05')
        local f = io.open(out, 'rb')
        local text = f and f:read('*a') or ''
        if f then f:close() end
      until text:find('%d') or os.time() > deadline
      os.execute(string.format('sleep %.2f; kill -9 %s', 0.05 + math.random() * 0.6, pid))
      os.execute(string.format('while kill -0 %s 2>/dev/null && ! grep -q "^State:.*Z" /proc/%s/status 2>/dev/null; do sleep 0.02; done', pid, pid))
      local tmp = io.popen(string.format("ls '%s' | grep -c '\\.tmp\\.%s$'", dir, pid)):read('*l')
      if tmp ~= '0' then torn = torn + 1 end
      local k = check_whole()
      assert.is_true(k >= first, string.format('round %d: the checkpoint (k = %d) predates the writer', round, k))
      assert.is_true(k > last)
      last = k
    end
    assert.is_true(torn > 0, 'no kill landed in the middle of a save')
    -- the next save clears the temporary file of the last killed writer
    checkpoint.save(path, { model = { w = T.ones(1) } })
    local leftovers = io.popen(string.format("ls '%s' | grep -c tmp", dir)):read('*l')
    assert.are.equal('0', leftovers)
  end)
end)
