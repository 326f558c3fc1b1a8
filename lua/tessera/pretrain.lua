-- tessera.pretrain — the masked-image-modeling training loop the pre-training recipes share
-- (MAE's main_pretrain.py / engine_pretrain.py): data, per-batch masks, AdamW with a per-iteration
-- warm-up + cosine schedule, gradient accumulation, checkpoints and exact resume, a held-out
-- reconstruction loss at step 0 and at the end, and the final pictures. cfg.precision = 'bf16' runs
-- the forward and the loss (training and held-out) under T.autocast('bfloat16'); the backward runs
-- outside it (the tape remembers the casts) and the optimizer updates float32 master weights.
-- 'fp16' does the same under T.autocast('float16') with a GradScaler, as the official runs' AMP
-- with MAE's NativeScaler (scale 2^16, halved on Inf/NaN gradients, doubled every 2000 clean steps;
-- the scale is logged and checkpointed).
-- cfg.dct_scaling = false decodes every JPEG at full size, as PIL does for the official code (true,
-- the loader's default, decodes at 1/2 to 1/8 scale when the crop is that much larger than the output).
--
-- A recipe supplies a `method` table:
--   method.build(cfg)               → the model
--   method.masks(cfg, n, generator) → the batch's mask [n, L] (1 = removed)
--   method.step(model, imgs, mask, generator) → loss, removed_pred ([n, R, p*p*3], raster order of
--                                     the removed patches) — `generator` feeds any further masking
--   method.patch(cfg)               → the loss patch size in pixels
local T = require 'tessera'
local core = require 'tessera.core'
local V = require 'tessera.visualize'
local merge = core.merge
local clock = core.now

local P = {}

-- ---- what every pre-training recipe has -----------------------------------------------------------
-- The loop's options with the official main_pretrain.py defaults: AdamW (0.9, 0.95), base lr
-- 1.5e-4 x batch / 256 (lr 0: derived), weight decay 0.05, 200 epochs with 10 of warm-up, batch 64.
-- Besides the rolling checkpoint, a copy checkpoint-<epoch>.safetensors (0-based, as the official
-- checkpoint-<epoch>.pth) is kept at the end of every keep_every_epochs-th epoch and of the last.
local LOOP_DEFAULTS = { data = 'fashion-mnist', eval_split = 'test', batch_size = 64, accum_iter = 1, epochs = 200,
  warmup_epochs = 10, blr = 1.5e-4, lr = 0, min_lr = 0, weight_decay = 0.05, clip_grad = 0, num_workers = 2,
  dct_scaling = true, seed = 0, log_every = 20, checkpoint_every = 500, keep_every_epochs = 100,
  max_iters_per_epoch = 0, eval_size = 16, stop_after = 0, device = 'cpu', precision = 'fp32' }
local LOOP_TYPES = { lr = 'number', min_lr = 'number', clip_grad = 'number', blr = 'number', weight_decay = 'number' }
local LOOP_PRESETS = {
  -- the official runs' effective batch of 4096 (128 per GPU x 4 accumulation x 8 GPUs) on one device
  paper = { batch_size = 128, accum_iter = 32 },
}

-- A recipe table (tessera.recipe's contract) from a recipe's own parts: the loop's defaults, types,
-- precision choice, model_keys and presets are filled in, and what the recipe gives wins.
function P.recipe(r)
  r.defaults = merge(LOOP_DEFAULTS, r.defaults)
  r.types = merge(LOOP_TYPES, r.types)
  r.choices = merge({ precision = { 'fp32', 'bf16', 'fp16' } }, r.choices)
  r.model_keys = r.model_keys or { 'model', 'input_size' }
  r.presets = merge(LOOP_PRESETS, r.presets)
  return r
end

-- A `tiny` preset: a few minutes on 2 cores (4 short epochs, a larger lr), with the recipe's small
-- model and input given as `model`.
function P.tiny_preset(model)
  return merge({ batch_size = 32, epochs = 4, warmup_epochs = 1, blr = 1.5e-3, max_iters_per_epoch = 300,
    checkpoint_every = 200, log_every = 10 }, model)
end

-- The loop's own options, checked before anything is built (0 turns each of the first four off);
-- the library checks the others where they are used, naming them.
local function check_options(cfg)
  for _, key in ipairs { 'checkpoint_every', 'keep_every_epochs', 'max_iters_per_epoch', 'stop_after' } do
    core.check_integer('pretrain', '--' .. key, cfg[key], 0)
  end
  core.check_integer('pretrain', '--log_every', cfg.log_every, 1)
  core.check_nonnegative('pretrain', '--clip_grad', cfg.clip_grad)
  core.check_nonnegative('pretrain', '--lr', cfg.lr)
end

-- The datasets a recipe can name: 'fashion-mnist' (Debian's dataset-fashion-mnist), an
-- ImageFolder directory, or 'list:ROOT:FILE' (official IN1K/train.txt style).
local FASHION = '/usr/share/datasets/fashion-mnist/'

function P.dataset(spec, split)
  if spec == 'fashion-mnist' then
    local prefix = split == 'test' and 't10k' or 'train'
    local images, labels = FASHION .. prefix .. '-images-idx3-ubyte.gz', FASHION .. prefix .. '-labels-idx1-ubyte.gz'
    local f = io.open(images)
    if not f then
      error('pretrain: Fashion-MNIST is not installed (' .. images .. '); run: apt-get install dataset-fashion-mnist', 0)
    end
    f:close()
    return T.data.IDX(images, labels)
  end
  local root, list = spec:match('^list:([^:]+):(.+)$')
  if root then return T.data.FileList(root, list) end
  return T.data.ImageFolder(spec)
end

local AUTOCAST = { fp32 = 'float32', bf16 = 'bfloat16', fp16 = 'float16' }

-- fn(...) in the run's precision: under autocast for 'bf16' and 'fp16' (a no-op on the CPU).
function P.in_precision(cfg, fn, ...)
  local dtype = AUTOCAST[cfg.precision or 'fp32']
  if not dtype then
    error("pretrain: precision must be 'fp32', 'bf16' or 'fp16', got '" .. tostring(cfg.precision) .. "'", 0)
  end
  if dtype == 'float32' then return fn(...) end
  return T.autocast(dtype, fn, ...)
end

-- Base learning rate scaled by the effective batch, as MAE: lr = blr * eff_batch / 256.
function P.learning_rate(cfg)
  if cfg.lr and cfg.lr > 0 then return cfg.lr end
  return cfg.blr * cfg.batch_size * cfg.accum_iter / 256
end

-- A fixed held-out batch and its masks, evaluated the same way every time.
local function held_out(cfg, method)
  local ds = P.dataset(cfg.data, cfg.eval_split)
  local loader = T.data.Loader(ds, { batch_size = cfg.eval_size, image_size = cfg.input_size, seed = cfg.seed + 1,
    num_workers = 1, shuffle = false, drop_last = false, scale = { 1, 1 }, ratio = { 1, 1 }, hflip = 0,
    dct_scaling = cfg.dct_scaling })
  loader:set_epoch(0)
  local imgs
  for batch in loader:iter() do imgs = batch:to(cfg.device); break end
  local g = T.Generator(cfg.seed + 2)
  local mask = method.masks(cfg, imgs:size(0), g)
  return function(model)
    local was_training = model.training
    model:eval()
    local loss, pred = T.no_grad(function()
      return P.in_precision(cfg, method.step, model, imgs, mask, T.Generator(cfg.seed + 3))
    end)
    model:train(was_training)
    return loss:item(), imgs, mask, pred
  end
end

-- method.step for the MAE-style models (UM-MAE Swin/PVT, MAE ViT): their decoder output ends with
-- the removed patches in raster order.
function P.masked_autoencoder_step(model, imgs, mask, generator)
  local loss, pred = model(imgs, mask, { generator = generator })
  local removed = mask[0]:to('int64'):sum():item()
  return loss, pred:narrow(1, pred:size(1) - removed, removed)
end

function P.train(cfg, run, method)
  check_options(cfg)
  local model = method.build(cfg):to(cfg.device) -- before the optimizer: to() replaces the parameters
  local lr = P.learning_rate(cfg)
  local groups = T.optim.param_groups_weight_decay(model, cfg.weight_decay)
  local optimizer = T.optim.AdamW(groups, { lr = lr, betas = { 0.9, 0.95 } })
  local schedule = T.optim.lr_schedule.cosine_warmup{ base_lr = lr, min_lr = cfg.min_lr,
    warmup_epochs = cfg.warmup_epochs, epochs = cfg.epochs }
  local loader = T.data.Loader(P.dataset(cfg.data, 'train'), { batch_size = cfg.batch_size,
    image_size = cfg.input_size, seed = cfg.seed, num_workers = cfg.num_workers, drop_last = true,
    dct_scaling = cfg.dct_scaling })
  local iters = loader:num_batches()
  if cfg.max_iters_per_epoch > 0 then iters = math.min(iters, cfg.max_iters_per_epoch) end
  local evaluate = held_out(cfg, method)
  local scaler = T.optim.GradScaler{ enabled = cfg.precision == 'fp16' }
  local accum = T.optim.Accumulator(optimizer, cfg.accum_iter, { max_norm = cfg.clip_grad > 0 and cfg.clip_grad or nil,
    scaler = scaler })

  local state = run:resume(model, optimizer, loader) or {}
  local extra = state.extra or {}
  local start_epoch, start_iter = state.epoch or 0, state.iter or 0
  local losses = extra.losses or { x = {}, y = {} }
  local loss0 = extra.loss0
  if not loss0 then loss0 = evaluate(model) end
  -- a checkpoint of an fp32 or bf16 run has no scale: an fp16 run resumed from it starts afresh
  if extra.scaler and next(extra.scaler) ~= nil then scaler:load_state_dict(extra.scaler) end
  local function save(epoch, iter, name)
    run:save_checkpoint{ model = model, optimizer = optimizer, loader = loader, epoch = epoch, iter = iter, name = name,
      extra = { loss0 = loss0, losses = losses, scaler = scaler:state_dict() } }
  end
  run:log{ event = 'start', held_out_loss = loss0, lr = lr, params = model:num_parameters(true) }

  local step, started = start_epoch * iters + start_iter, clock()
  local first_step = step
  -- a checkpoint every checkpoint_every steps, taken at the first window end from there on: a
  -- checkpoint holds no half-summed gradients, and with accumulation the two periods need not meet
  local function next_checkpoint_after(s) return (math.floor(s / cfg.checkpoint_every) + 1) * cfg.checkpoint_every end
  local next_checkpoint = cfg.checkpoint_every > 0 and next_checkpoint_after(step) or math.huge
  local images_seen = 0
  for epoch = start_epoch, cfg.epochs - 1 do
    loader:set_epoch(epoch)
    accum:reset() -- as MAE: every epoch starts with no gradients (a partial window is dropped)
    local it = 0
    for imgs in loader:iter() do
      if it >= iters then break end
      if epoch > start_epoch or it >= start_iter then
        if it % cfg.accum_iter == 0 then T.optim.adjust_learning_rate(optimizer, epoch + it / iters, schedule) end
        local mask = method.masks(cfg, imgs:size(0)) -- made on the host, as the official loaders make them
        local loss = P.in_precision(cfg, method.step, model, imgs:to(cfg.device), mask)
        local value = loss:item()
        run:check_loss(value, step)
        accum:backward(loss) -- the accumulator divides by accum_iter
        step, images_seen = step + 1, images_seen + imgs:size(0)
        losses.x[#losses.x + 1], losses.y[#losses.y + 1] = step, value
        local current_lr = optimizer.param_groups[1].lr
        run:progress{ epoch = epoch + 1, epochs = cfg.epochs, iter = it + 1, iters = iters, loss = value, lr = current_lr,
          images_per_s = images_seen / math.max(clock() - started, 1e-9) }
        if step % cfg.log_every == 0 then
          run:log{ epoch = epoch, iter = it, step = step, loss = value, lr = current_lr,
            loss_scale = scaler:is_enabled() and scaler:get_scale() or nil }
        end
        if step >= next_checkpoint and accum:at_window_start() then
          save(epoch, it + 1)
          next_checkpoint = next_checkpoint_after(step)
        end
        -- a time-boxed run (stop_after steps in this process) leaves a checkpoint to resume from
        if cfg.stop_after > 0 and step - first_step >= cfg.stop_after and accum:at_window_start() then
          save(epoch, it + 1)
          run:summary(string.format('stopped after %d steps (stop_after); resume with --resume %s', step - first_step,
            run.output_dir .. '/checkpoint.safetensors'))
          return { loss0 = loss0, steps = step, stopped = true }
        end
      end
      it = it + 1
    end
    start_iter = 0
    local done = epoch + 1
    if cfg.keep_every_epochs > 0 and (done % cfg.keep_every_epochs == 0 or done == cfg.epochs) then
      save(done, 0, 'checkpoint-' .. epoch)
    end
  end
  save(cfg.epochs, 0)

  local final, imgs, mask, pred = evaluate(model)
  local seconds = clock() - started
  run:log{ event = 'end', held_out_loss = final, held_out_loss_at_step0 = loss0, ratio = final / loss0, steps = step,
    seconds = seconds }
  local curve = run.output_dir .. '/loss_curve.png'
  V.loss_curve(curve, { { name = 'train loss', x = losses.x, y = losses.y } },
    { title = cfg.title or 'pre-training loss', xlabel = 'iteration' })
  local grid = run.output_dir .. '/reconstructions.png'
  V.reconstruction_grid(grid, imgs, mask, pred, { patch = method.patch(cfg), norm_pix = cfg.norm_pix_loss })
  run:summary(string.format('%s: %d steps in %.0f s (%.1f images/s); held-out loss %.4f at step 0 -> %.4f (%.2fx); %s, %s',
    cfg.title or 'pre-training', step, seconds, images_seen / math.max(seconds, 1e-9), loss0, final, final / loss0,
    curve, grid))
  return { loss0 = loss0, final = final, steps = step }
end

return P
