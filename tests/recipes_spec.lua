-- recipes_spec.lua — a short smoke run of every pre-training recipe on a few tiny PNG images:
-- each trains a couple of steps, checkpoints, and leaves its log and both pictures behind; the
-- UM-MAE recipe also resumes exactly, keeps per-epoch checkpoint copies, and trains in fp16 with a
-- loss scaler (on the CPU: the fp32 losses).
local T = require 'tessera'
local R = require 'tessera.recipe'
local S = require 'support'
local json = T.json

local dir = os.tmpname()
os.remove(dir)
local data = dir .. '/images'
os.execute(string.format('mkdir -p %q/a %q/b', data, data))

-- Eight 40x40 colour images in two classes.
T.manual_seed(11)
for i = 1, 8 do
  local img = (T.rand(40, 40, 3) * 255):to('uint8')
  T.image.write_png(string.format('%s/%s/%d.png', data, i % 2 == 0 and 'a' or 'b', i), img)
end

local function run(recipe, out, extra)
  local args = { '--data', data, '--eval_split', 'train', '--input_size', '64', '--batch_size', '4', '--epochs', '2',
    '--warmup_epochs', '1', '--max_iters_per_epoch', '2', '--eval_size', '4', '--num_workers', '1',
    '--checkpoint_every', '1', '--log_every', '1', '--output_dir', out }
  for _, a in ipairs(extra or {}) do args[#args + 1] = a end
  return R.run('recipes/' .. recipe .. '.lua', args)
end

local function lines(path)
  local out = {}
  for line in io.lines(path) do out[#out + 1] = json.decode(line) end
  return out
end

-- The training losses a run logged, in order.
local function losses(path)
  local out = {}
  for _, l in ipairs(lines(path)) do if l.loss then out[#out + 1] = l.loss end end
  return out
end

local function assert_outputs(out)
  for _, f in ipairs { 'log.jsonl', 'loss_curve.png', 'reconstructions.png', 'checkpoint.safetensors', 'config.json' } do
    local h = io.open(out .. '/' .. f)
    assert(h, out .. '/' .. f .. ' is missing')
    h:close()
  end
  local last = lines(out .. '/log.jsonl')
  assert.equal('end', last[#last].event)
  assert.is_true(last[#last].held_out_loss > 0)
end

describe('pre-training recipes', function()
  it('UM-MAE trains a micro Swin, and a resumed run equals an uninterrupted one', function()
    local straight, split = dir .. '/um', dir .. '/um-resumed'
    run('pretrain_ummae', straight, { '--model', 'swin_micro' })
    assert_outputs(straight)
    run('pretrain_ummae', split, { '--model', 'swin_micro', '--stop_after', '3' }) -- interrupted mid-epoch
    run('pretrain_ummae', split, { '--model', 'swin_micro', '--resume', split .. '/checkpoint.safetensors' })
    local a, b = losses(straight .. '/log.jsonl'), losses(split .. '/log.jsonl')
    assert.equal(4, #a)
    assert.same(a, b)
  end)

  it('resumes exactly with gradient accumulation, stopping only at a window boundary', function()
    local straight, split = dir .. '/acc', dir .. '/acc-resumed'
    local acc = { '--model', 'swin_micro', '--accum_iter', '2', '--batch_size', '2', '--max_iters_per_epoch', '4' }
    run('pretrain_ummae', straight, acc)
    local first = { unpack(acc) }
    for _, a in ipairs { '--stop_after', '1' } do first[#first + 1] = a end -- waits for the window: stops after 2
    run('pretrain_ummae', split, first)
    local resume = { unpack(acc) }
    for _, a in ipairs { '--resume', split .. '/checkpoint.safetensors' } do resume[#resume + 1] = a end
    run('pretrain_ummae', split, resume)
    local a, b = losses(straight .. '/log.jsonl'), losses(split .. '/log.jsonl')
    assert.equal(8, #a)
    assert.same(a, b)
  end)

  it('refuses bad loop options and image sizes with messages naming them', function()
    local function bad(key, value)
      return function() run('pretrain_ummae', dir .. '/bad', { '--model', 'swin_micro', key, value }) end
    end
    S.assert_error(bad('--checkpoint_every', '-5'), 'pretrain: --checkpoint_every must be a non-negative integer, got -5')
    S.assert_error(bad('--keep_every_epochs', '-1'), 'pretrain: --keep_every_epochs must be a non-negative integer, got -1')
    S.assert_error(bad('--input_size', '100'), 'MaskedAutoencoderSwin: img_size 100 is not a multiple of stride 8')
  end)

  it('the paper presets give the official effective batch of 4096', function()
    local function config(recipe, preset)
      return R.parse(R.load('recipes/' .. recipe .. '.lua'), { '--preset', preset }).config
    end
    for _, recipe in ipairs { 'pretrain_ummae', 'pretrain_simmim', 'pretrain_mae' } do
      local cfg = config(recipe, 'paper')
      assert.equal(4096, cfg.batch_size * cfg.accum_iter, recipe)
    end
    local large = config('pretrain_ummae', 'paper_swin_large')
    assert.same({ 'swin_large', 4096, 800, 40 },
      { large.model, large.batch_size * large.accum_iter, large.epochs, large.warmup_epochs })
  end)

  -- Runs fn with checkpoint.save recording {epoch, iter, file name} of every save; returns them.
  local function saves(fn)
    local checkpoint = require 'tessera.checkpoint'
    local save, saved = checkpoint.save, {}
    checkpoint.save = function(path, b)
      saved[#saved + 1] = { b.epoch, b.iter, path:match('[^/]+$') }
      return save(path, b)
    end
    local ok, err = pcall(fn)
    checkpoint.save = save
    assert(ok, err)
    return saved
  end

  it('checkpoints at the first window end after each checkpoint_every steps', function()
    -- 8 iterations an epoch in windows of 3 (the last 2 dropped, as MAE); every 2 steps asked for
    local saved = saves(function()
      run('pretrain_ummae', dir .. '/cadence', { '--model', 'swin_micro', '--accum_iter', '3', '--batch_size', '1',
        '--max_iters_per_epoch', '8', '--checkpoint_every', '2', '--keep_every_epochs', '0' })
    end)
    local c = 'checkpoint.safetensors'
    assert.same({ { 0, 3, c }, { 0, 6, c }, { 1, 3, c }, { 1, 6, c }, { 2, 0, c } }, saved)
  end)

  it('keeps checkpoint-<epoch> copies every keep_every_epochs epochs and at the end, as the official runs', function()
    local function kept(every)
      local names = {}
      for _, s in ipairs(saves(function()
        run('pretrain_ummae', dir .. '/keep-' .. every, { '--model', 'swin_micro', '--epochs', '5',
          '--max_iters_per_epoch', '1', '--checkpoint_every', '0', '--keep_every_epochs', every })
      end)) do
        if s[3] ~= 'checkpoint.safetensors' then names[#names + 1] = string.format('%s@%d.%d', s[3], s[1], s[2]) end
      end
      return table.concat(names, ' ')
    end
    assert.equal('checkpoint-1.safetensors@2.0 checkpoint-3.safetensors@4.0 checkpoint-4.safetensors@5.0', kept('2'))
    assert.equal('checkpoint-4.safetensors@5.0', kept('100'))
    assert.equal('', kept('0'))
    -- a copy resumes like the rolling checkpoint: the last three epochs' losses again
    local resumed = dir .. '/keep-resumed'
    run('pretrain_ummae', resumed, { '--model', 'swin_micro', '--epochs', '5', '--max_iters_per_epoch', '1',
      '--checkpoint_every', '0', '--resume', dir .. '/keep-2/checkpoint-1.safetensors' })
    local straight, again = losses(dir .. '/keep-2/log.jsonl'), losses(resumed .. '/log.jsonl')
    assert.equal(5, #straight)
    assert.same({ straight[3], straight[4], straight[5] }, again)
  end)

  it('fp16 scales the loss (on the CPU the fp32 losses exactly), logs the scale and resumes with it', function()
    local fp32, fp16 = dir .. '/fp32', dir .. '/fp16'
    run('pretrain_ummae', fp32, { '--model', 'swin_micro' })
    run('pretrain_ummae', fp16, { '--model', 'swin_micro', '--precision', 'fp16' })
    assert.same(losses(fp32 .. '/log.jsonl'), losses(fp16 .. '/log.jsonl'))
    local scales = {}
    for _, l in ipairs(lines(fp16 .. '/log.jsonl')) do if l.loss then scales[#scales + 1] = l.loss_scale end end
    assert.same({ 65536, 65536, 65536, 65536 }, scales)
    local bundle = require('tessera.checkpoint').load(fp16 .. '/checkpoint.safetensors')
    assert.same({ scale = 65536, growth_factor = 2, backoff_factor = 0.5, growth_interval = 2000, _growth_tracker = 4 },
      bundle.extra.scaler)
    local resumed = dir .. '/fp16-resumed'
    run('pretrain_ummae', resumed, { '--model', 'swin_micro', '--precision', 'fp16', '--stop_after', '1' })
    run('pretrain_ummae', resumed, { '--model', 'swin_micro', '--precision', 'fp16', '--resume',
      resumed .. '/checkpoint.safetensors' })
    assert.same(losses(fp16 .. '/log.jsonl'), losses(resumed .. '/log.jsonl'))
    assert.equal(4, require('tessera.checkpoint').load(resumed .. '/checkpoint.safetensors').extra.scaler._growth_tracker)
  end)

  it("SimMIM trains a micro Swin with the paper's random masks and with SimMIM's own", function()
    run('pretrain_simmim', dir .. '/simmim', { '--model', 'swin_micro' })
    assert_outputs(dir .. '/simmim')
    run('pretrain_simmim', dir .. '/simmim-blocks', { '--model', 'swin_micro', '--sampling', 'simmim', '--mask_ratio', '0.6',
      '--dct_scaling', 'false' })
    assert_outputs(dir .. '/simmim-blocks')
  end)

  it('MAE trains a micro ViT with each sampling strategy', function()
    for _, s in ipairs { 'rs', 'gs', 'us', 'um' } do
      run('pretrain_mae', dir .. '/mae-' .. s, { '--model', 'vit_micro', '--sampling', s })
      assert_outputs(dir .. '/mae-' .. s)
    end
  end)

  it('refuses unknown options and bad choices with the valid ones', function()
    local ok, err = pcall(run, 'pretrain_ummae', dir .. '/bad', { '--modle', 'swin_micro' })
    assert.is_false(ok)
    assert.truthy(tostring(err):find('modle', 1, true))
    ok, err = pcall(run, 'pretrain_mae', dir .. '/bad2', { '--sampling', 'xx' })
    assert.is_false(ok)
    assert.truthy(tostring(err):find('rs', 1, true))
  end)
end)
