-- recipe_spec.lua — the recipe runner (tessera.recipe): option parsing and its errors, presets,
-- --help, the JSONL log, checkpoints and exact resume, the NaN stop, and `tessera run` itself.
-- The runs use tests/fixtures/linreg_recipe.lua (8 iterations per epoch, 2 epochs by default).
local each = require 'tessera.each'
local T = require 'tessera'
local S = require 'support'
local R = require 'tessera.recipe'
local checkpoint = require 'tessera.checkpoint'
local TESSERA = require 'fixtures.tessera_bin'

local FIXTURE = 'tests/fixtures/linreg_recipe.lua'

local tmpdir = S.tmpdir

local function read(path)
  local f = io.open(path, 'rb')
  if not f then return nil end
  local s = f:read('*a')
  f:close()
  return s
end

local function lines(text)
  local out = {}
  for line in (text or ''):gmatch('[^\n]+') do out[#out + 1] = line end
  return out
end

-- A file-like sink that keeps what the runner prints.
local function sink()
  local parts = {}
  return { write = function(_, ...) for _, s in ipairs { ... } do parts[#parts + 1] = tostring(s) end end,
    flush = function() end, text = function() return table.concat(parts) end }
end

local function run(argv, recipe)
  local out = sink()
  local result = R.run(recipe or FIXTURE, argv, { stdout = out })
  return result, out:text()
end

-- Runs a shell command; returns its exit status and its output (stdout and stderr).
local function shell(cmd)
  local p = io.popen('(' .. cmd .. ') 2>&1; echo "exit=$?"')
  local text = p:read('*a')
  p:close()
  local status = tonumber(text:match('exit=(%d+)%s*$'))
  return status, (text:gsub('exit=%d+%s*$', ''))
end

local function demo(fields)
  local r = {
    name = 'demo', description = 'A demo recipe.\nSecond line.',
    defaults = { epochs = 3, lr = 0.5, warmup = 1, name = 'x', flag = false, dims = { 2, 3 }, scales = { 0.5 },
      tags = { 'a' }, model = 'small' },
    types = { warmup = 'number' },
    choices = { model = { 'small', 'large' } },
    help = { lr = 'peak learning rate' },
    presets = { quick = { epochs = 1, lr = 0.1 }, big = { model = 'large', dims = '4,5' } },
    main = function(cfg) return cfg end,
  }
  for k, v in each(fields or {}) do
    if k == 'defaults' then
      for name, default in each(v) do r.defaults[name] = default end
    else
      r[k] = v
    end
  end
  return r
end

local function parse(argv, r) return R.parse(R.check(r or demo()), argv).config end

describe('recipe options', function()
  it('take values of the type of their defaults', function()
    local cfg = parse { '--epochs', '5', '--lr', '1e-3', '--warmup', '0.25', '--name', 'run 1', '--flag', '1',
      '--dims', '4, 5,6', '--scales', '1,2.5', '--tags', 'x,y z' }
    assert.are.same({ epochs = 5, lr = 1e-3, warmup = 0.25, name = 'run 1', flag = true, dims = { 4, 5, 6 },
      scales = { 1, 2.5 }, tags = { 'x', 'y z' }, model = 'small', seed = 0 }, cfg)
    assert.are.same({}, parse({ '--dims', '' }).dims)
    assert.is_false(parse({ '--flag', 'false' }).flag)
    assert.is_false(parse({ '--flag', '0' }).flag)
    assert.is_true(parse({ '--flag' }).flag)
    assert.is_true(parse({ '--flag', '--epochs', '2' }).flag)
    assert.are.equal(7, parse({ '--epochs=7' }).epochs)
    assert.are.equal(11, parse({ '--seed', '11' }).seed)
    local r = demo { defaults = { batch_size = 4 } }
    assert.are.equal(9, parse({ '--batch-size', '9' }, r).batch_size)
  end)

  it('reject values of the wrong type, naming the option', function()
    S.assert_error(function() parse { '--epochs', '2.5' } end, "--epochs expects an integer, got '2.5'")
    S.assert_error(function() parse { '--lr', 'fast' } end, "--lr expects a number, got 'fast'")
    S.assert_error(function() parse { '--flag', 'yes' } end, 'expects a boolean')
    S.assert_error(function() parse { '--dims', '1,x' } end, 'comma-separated list of integers', "'x' is not an integer")
    S.assert_error(function() parse { '--model', 'huge' } end, '--model must be one of small, large, got huge')
    S.assert_error(function() parse { '--epochs' } end, 'option --epochs needs a value')
    S.assert_error(function() parse { 'epochs', '3' } end, "unexpected argument 'epochs'")
  end)

  it('refuse unknown keys, listing the valid ones', function()
    S.assert_error(function() parse { '--epoch', '3' } end, 'unknown option --epoch for recipe demo',
      'did you mean --epochs?', 'valid options: --dims, --epochs, --flag, --lr, --model, --name, --scales, --seed, --tags, --warmup',
      'runner options: --output_dir, --resume, --preset, --overwrite, --help')
    S.assert_error(function() parse { '--zzz', '1' } end, 'unknown option --zzz', 'valid options:')
  end)

  it('apply presets before the command line, whatever the order', function()
    local cfg = parse { '--epochs', '9', '--preset', 'quick' }
    assert.are.equal(9, cfg.epochs)
    assert.are.equal(0.1, cfg.lr)
    cfg = parse { '--preset', 'quick', '--preset', 'big' }
    assert.are.same({ 4, 5 }, cfg.dims)
    assert.are.equal('large', cfg.model)
    S.assert_error(function() parse { '--preset', 'fast' } end, "no preset 'fast'", 'presets: big, quick')
    local bad = demo { presets = { wrong = { epochs = 'many' } } }
    S.assert_error(function() parse({ '--preset', 'wrong' }, bad) end, 'preset wrong', '--epochs expects an integer')
    bad = demo { presets = { wrong = { nope = 1 } } }
    S.assert_error(function() parse({ '--preset', 'wrong' }, bad) end, 'unknown option --nope')
  end)

  it('check the recipe itself', function()
    S.assert_error(function() R.check(demo { main = 1 }) end, 'main must be a function')
    S.assert_error(function() R.check(demo { defaults = { dims = {} } }) end, "default of 'dims' is an empty list",
      "types = { dims = 'integer[]' }")
    assert.are.same({ 1, 2 }, parse({ '--dims', '1,2' }, demo { defaults = { dims = {} }, types = { dims = 'integer[]' } }).dims)
    S.assert_error(function() R.check(demo { defaults = { output_dir = 'x' } }) end, "'output_dir' is a runner option")
    S.assert_error(function() R.check(demo { types = { lr = 'float' } }) end, "types.lr is 'float'")
    S.assert_error(function() R.check(demo { types = { epochs = 'string' } }) end, "default of 'epochs' (3) is not a string")
    S.assert_error(function() R.check(demo { model_keys = { 'width' } }) end, "model_keys names 'width'")
    S.assert_error(function() R.check(demo { choices = { model = { 'a', 'b' } } }) end, "default of 'model' (small) is not one of its choices")
    S.assert_error(function() R.check(demo { choices = { dims = { 1 } } }) end, 'only single-valued options take choices')
    S.assert_error(function() R.check(demo { extra_field = 1 }) end, "unknown field 'extra_field'")
  end)

  it('--help prints the description, the options with their defaults and the presets', function()
    local _, text = run({ '--help' }, demo())
    for _, frag in ipairs { 'usage: tessera run', 'A demo recipe.\nSecond line.', '--epochs INT', 'default: 3',
      '--lr NUM', 'peak learning rate (default: 0.5)', '--dims INT,...', 'default: 2,3', '--flag BOOL',
      'default: false', "one of small, large", 'presets (--preset NAME):', 'quick', 'epochs=1 lr=0.1',
      '--output_dir DIR', 'output/demo', '--resume PATH|auto', '--seed INT' } do
      assert.is_truthy(text:find(frag, 1, true), 'help lacks ' .. frag .. ':\n' .. text)
    end
  end)
end)

describe('recipe runs', function()
  local dirs = {}
  local function fresh()
    local d = tmpdir()
    dirs[#dirs + 1] = d
    return d
  end
  teardown(function() for _, d in ipairs(dirs) do os.execute("rm -rf '" .. d .. "'") end end)

  local straight
  local function straight_run()
    if not straight then
      straight = fresh()
      run { '--output_dir', straight }
    end
    return straight
  end

  local function same_final_weights(a, b)
    local ca, cb = checkpoint.load(a .. '/checkpoint.safetensors'), checkpoint.load(b .. '/checkpoint.safetensors')
    for name, t in each(ca.model) do assert.is_true(cb.model[name]:eq(t):all():item(), name .. ' differs') end
    assert.are.same(ca.position, cb.position)
  end

  it('prints the config and logs one JSON object per iteration', function()
    local dir = fresh()
    local result, text = run { '--output_dir', dir, '--preset', 'tiny', '--lr', '0.01' }
    assert.are.equal(2, result.steps)
    assert.is_truthy(text:find('recipe linreg_recipe: Linear regression', 1, true))
    assert.is_truthy(text:find('\n  lr%s+0.01\n'))
    assert.is_truthy(text:find('\n  epochs%s+1\n'))
    assert.is_truthy(text:find('output_dir%s+' .. dir:gsub('%p', '%%%0')))
    local log = lines(read(dir .. '/log.jsonl'))
    assert.are.equal(2, #log)
    for i, line in ipairs(log) do
      local e = T.json.decode(line)
      assert.are.equal(i, e.step)
      assert.are.equal(0, e.epoch)
      assert.are.equal(i, e.iter)
      assert.are.equal('number', type(e.loss))
      assert.are.equal('number', type(e.lr))
    end
    local config = T.json.decode(read(dir .. '/config.json'))
    assert.are.equal(0.01, config.config.lr)
    assert.are.equal('linreg_recipe', config.recipe)
    assert.is_truthy(read(dir .. '/summary.txt'):find('linreg: 2 steps', 1, true))
    local b = checkpoint.load(dir .. '/checkpoint.safetensors')
    assert.are.same({ epoch = 0, iter = 2, step = 2, iters = 2 }, b.position)
    assert.are.equal(0.01, b.config.lr)
  end)

  it('logs non-finite numbers and one-element tensors as JSON can hold them', function()
    local dir = fresh()
    run({ '--output_dir', dir }, { name = 'logger', defaults = {}, main = function(_, r)
      r:log{ nan = 0 / 0, inf = math.huge, t = T.tensor(2.5), nested = { x = -math.huge } }
      S.assert_error(function() r:log{ big = T.ones(3) } end, "'entry.big' is a tensor of shape [3]")
    end })
    assert.are.same({ nan = 'nan', inf = 'inf', t = 2.5, nested = { x = '-inf' } }, T.json.decode(read(dir .. '/log.jsonl')))
  end)

  it('resumes at an epoch boundary with the losses of an uninterrupted run, bit for bit', function()
    local a, b = straight_run(), fresh()
    run { '--output_dir', b, '--stop_after_steps', '8' }
    assert.are.equal(8, #lines(read(b .. '/log.jsonl')))
    local _, text = run { '--output_dir', b, '--resume', b .. '/checkpoint.safetensors' }
    assert.is_truthy(text:find('resumed from ' .. b .. '/checkpoint.safetensors: epoch 0, iter 8, step 8', 1, true))
    assert.are.equal(16, #lines(read(a .. '/log.jsonl')))
    assert.are.equal(read(a .. '/log.jsonl'), read(b .. '/log.jsonl'))
    same_final_weights(a, b)
  end)

  it('resumes in the middle of an epoch just as exactly', function()
    local a, b = straight_run(), fresh()
    run { '--output_dir', b, '--stop_after_steps', '11', '--checkpoint_every', '4' }
    local c = checkpoint.load(b .. '/checkpoint.safetensors')
    assert.are.same({ epoch = 1, iter = 3, step = 11, iters = 8 }, c.position)
    assert.are.same({ epoch = 1, position = 3 }, c.loader)
    run { '--output_dir', b, '--resume', 'auto' }
    assert.are.equal(read(a .. '/log.jsonl'), read(b .. '/log.jsonl'))
    same_final_weights(a, b)
  end)

  it('stops on a NaN loss naming the iteration, keeping the last good checkpoint', function()
    local a, b = straight_run(), fresh()
    local path = b .. '/checkpoint.safetensors'
    S.assert_error(function()
      run { '--output_dir', b, '--checkpoint_every', '4', '--nan_at_step', '11' }
    end, 'the loss is nan at iteration 11', 'last good checkpoint is kept: ' .. path, 'step 8')
    S.assert_error(function() run { '--output_dir', fresh(), '--nan_at_step', '1' } end,
      'the loss is nan at iteration 1', 'No checkpoint was saved before it')
    local c = checkpoint.load(path)
    assert.are.equal(8, c.position.step)
    for name, t in each(c.model) do assert.is_true(t:isfinite():all():item(), name) end
    assert.are.equal(10, #lines(read(b .. '/log.jsonl')))
    -- resuming rewinds the log to the checkpoint: the result equals the uninterrupted run
    run { '--output_dir', b, '--resume', 'auto' }
    assert.are.equal(read(a .. '/log.jsonl'), read(b .. '/log.jsonl'))
  end)

  it('refuses to save non-finite weights over a good checkpoint', function()
    local dir = fresh()
    local path = dir .. '/checkpoint.safetensors'
    S.assert_error(function()
      run({ '--output_dir', dir }, { name = 'diverge', defaults = {}, main = function(_, r)
        local model = T.nn.Linear(2, 2)
        r:resume(model)
        r:save_checkpoint{ epoch = 1 }
        T.no_grad(function() model.weight:fill_(0 / 0) end)
        r:save_checkpoint{ epoch = 2 }
      end })
    end, "the model's weight has NaN or infinite values", 'not saving')
    local c = checkpoint.load(path)
    assert.are.equal(1, c.position.epoch)
    assert.is_true(c.model.weight:isfinite():all():item())
  end)

  it('refuses a checkpoint of another model before touching anything', function()
    local a = straight_run()
    local before = read(a .. '/log.jsonl')
    S.assert_error(function()
      run { '--output_dir', a, '--resume', 'auto', '--hidden', '9', '--dtype', 'float64' }
    end, 'trained with a different model', 'hidden = 8 in the checkpoint, 9 now', 'dtype = float32 in the checkpoint, float64 now')
    assert.are.equal(before, read(a .. '/log.jsonl'))
    S.assert_error(function() run { '--output_dir', a, '--resume', a .. '/nothing.safetensors' } end,
      'resume: checkpoint: cannot load', 'nothing.safetensors')
  end)

  it('protects an existing checkpoint from a fresh run', function()
    local dir = fresh()
    run { '--output_dir', dir, '--preset', 'tiny' }
    S.assert_error(function() run { '--output_dir', dir, '--preset', 'tiny' } end, 'already holds a checkpoint',
      '--resume auto', '--overwrite')
    local result = run { '--output_dir', dir, '--preset', 'tiny', '--overwrite' }
    assert.are.equal(2, result.steps)
    assert.are.equal(2, #lines(read(dir .. '/log.jsonl')))
  end)

  it('restores recipe generators and seeds them from cfg.seed and their name', function()
    local dir = fresh()
    local draws = {}
    local function recipe(tag)
      return { name = 'gens', defaults = { seed = 5 }, main = function(_, r)
        local g = r:generator('noise')
        local model = T.nn.Linear(1, 1)
        local start = r:resume(model)
        if not start then
          T.rand({ 3 }, { generator = g })
          r:save_checkpoint{ step = 1 }
        end
        draws[tag] = T.rand({ 2 }, { generator = g }):totable()
        draws[tag .. '_default'] = T.rand({ 2 }):totable()
      end }
    end
    run({ '--output_dir', dir }, recipe('first'))
    run({ '--output_dir', dir, '--resume', 'auto' }, recipe('resumed'))
    assert.are.same(draws.first, draws.resumed)
    assert.are.same(draws.first_default, draws.resumed_default)
    run({ '--output_dir', fresh() }, { name = 'g2', defaults = {}, main = function(_, r)
      assert.are_not.same(r:generator('x'):get_state().seed, r:generator('y'):get_state().seed)
      assert.are.equal(r:generator('x'), r:generator('x'))
    end })
  end)
end)

describe('tessera run', function()
  it('runs a recipe file with its options, and prints --help', function()
    local status, out = shell(string.format("'%s' run %s --help", TESSERA, FIXTURE))
    assert.are.equal(0, status)
    assert.is_truthy(out:find('--stop_after_steps INT', 1, true))
    local dir = tmpdir()
    status, out = shell(string.format("'%s' run %s --output_dir '%s' --preset tiny", TESSERA, FIXTURE, dir))
    assert.are.equal(0, status, out)
    assert.is_truthy(out:find('linreg: 2 steps', 1, true))
    os.execute("rm -rf '" .. dir .. "'")
  end)

  it('exits with 2 for bad options and 1 for a failed run, with the message on stderr', function()
    local status, out = shell(string.format("'%s' run %s --bogus 1 2>&1 >/dev/null", TESSERA, FIXTURE))
    assert.are.equal(2, status)
    assert.is_truthy(out:find('unknown option --bogus', 1, true))
    assert.is_truthy(out:find('valid options: --batch_size', 1, true))
    local dir = tmpdir()
    status, out = shell(string.format("'%s' run %s --output_dir '%s' --nan_at_step 3", TESSERA, FIXTURE, dir))
    assert.are.equal(1, status)
    assert.is_truthy(out:find('the loss is nan at iteration 3', 1, true))
    assert.is_falsy(out:find('stack traceback', 1, true))
    os.execute("rm -rf '" .. dir .. "'")
  end)

  it('runs plain scripts with their arguments', function()
    local script = os.tmpname() .. '.lua'
    local f = io.open(script, 'w')
    f:write("local T = require 'tessera'\nprint(arg[0] ~= nil, T.ones(2):sum():item(), ...)\n")
    f:close()
    local status, out = shell(string.format("'%s' run '%s' a --b", TESSERA, script))
    assert.are.equal(0, status)
    assert.is_truthy(out:find('true\t2\ta\t--b', 1, true), out)
    f = io.open(script, 'w')
    f:write("error('script failed')\n")
    f:close()
    status, out = shell(string.format("'%s' run '%s'", TESSERA, script))
    assert.are.equal(1, status)
    assert.is_truthy(out:find('script failed', 1, true))
    os.remove(script)
  end)
end)
