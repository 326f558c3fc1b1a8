-- tessera.masks — patch masks for masked image modeling (T.masks) and UM-MAE's compaction.
--
-- Every generator returns a Mask object:
--   mask      uint8 [N, h*w], 1 = removed, 0 = visible, patches row-major on the h x w grid
--   new_mask  (after secondary masking) uint8 [N, h*w], 1 = removed or replaced by the token
--   vis_mask  (after secondary masking) uint8 [N, V], 1 = replaced, over the visible patches
--   h, w, strategy, ratio (share removed), secondary_ratio, formula
-- tostring(m) draws the grids as the reference README does: '#' removed, 'o' secondary-masked,
-- '.' visible, the images side by side.
--
--   T.masks.random(n, h, w, {ratio = 0.75, generator =, noise =})   MAE's random sampling (RS)
--   T.masks.grid(n, h, w, {generator =})                              grid-wise sampling (GS)
--   T.masks.uniform(n, h, w, {generator =})                           uniform sampling (US)
--   T.masks.simmim(n, {input_size = 192, mask_patch_size = 32, model_patch_size = 4, ratio = 0.6})
--   T.masks.uniform_masking(n, h, w, {ratio = 0.25, formula = 'swin', generator =, noise =})
--                                                                     US + secondary masking (UM)
--   Each generator takes {device = 'cuda'} to make its masks there (default 'cpu'); in masks.random,
--   given noise decides the device itself. Secondary masks follow their primary mask's device.
--   T.masks.secondary(mask, {ratio = 0.25, formula = 'swin' | 'vit', noise =, generator =})
--   T.uniform_compact(x, mask, patch_tokens), alias T.masks.compact
--   T.masks.render(path, img, masks, {labels =, denormalize =, index =, original =})   a PNG figure
--   T.masks.show(img, mask, {width = 64, index =}) / T.masks.show_string(...)       24-bit terminal view
-- Randomness comes from a generator's Philox stream (see ts_mask_generate in tessera.h): the same
-- generator state gives the same masks on every device. The training recipes make their masks on
-- the host, as the official data loaders do: compaction reads and checks the mask there anyway.
local each = require 'tessera.each'
local core = require 'tessera.core'
require 'tessera.image'
local Canvas = require 'tessera.canvas'
local data = require 'tessera.data'
local ffi, C, T = core.ffi, core.C, core.T
local wrap, handle, check = core.wrap, core.handle, core.check

local masks = {}

-- ---- arguments ---------------------------------------------------------------------------------
local function generator_handle(g, what)
  if g == nil then return nil end
  if not T.is_generator(g) then error(string.format('%s: generator must be a T.Generator, got %s', what, type(g)), 0) end
  return g.h
end

local check_integer, check_number = core.check_integer, core.check_number

-- ---- the Mask object ---------------------------------------------------------------------------
local Mask = {}
Mask.__index = Mask
masks.Mask = Mask

local function is_mask(x) return getmetatable(x) == Mask end
masks.is_mask = is_mask

local function new_mask(fields) return setmetatable(fields, Mask) end

-- Number of images.
function Mask:size() return self.mask.shape[1] end

-- Removed patches per image (the same in every image for every strategy here).
function Mask:num_removed()
  if self:size() == 0 then return 0 end
  return self.mask:select(0, 0):to('int64'):sum():item()
end

-- '#', 'o' or '.' for every patch of image i (0-based), as rows of text.
local function grid_rows(m, i, mask_values, new_values)
  local rows, l = {}, m.h * m.w
  for y = 0, m.h - 1 do
    local chars = {}
    for x = 0, m.w - 1 do
      local k = i * l + y * m.w + x
      local c = '.'
      if mask_values[k] ~= 0 then c = '#' elseif new_values and new_values[k] ~= 0 then c = 'o' end
      chars[#chars + 1] = c
    end
    rows[#rows + 1] = table.concat(chars)
  end
  return rows
end

local MAX_DRAWN = 8  -- images drawn by tostring; the rest are counted

function Mask:__tostring()
  local n, l = self:size(), self.h * self.w
  local header = string.format('Mask(%s, %d image%s, %d x %d patches, %d of %d removed', self.strategy, n,
    n == 1 and '' or 's', self.h, self.w, self:num_removed(), l)
  if self.new_mask then
    header = header .. string.format(', secondary %g (%s)', self.secondary_ratio, self.formula)
  end
  header = header .. ')'
  if n == 0 or l == 0 then return header end
  local mask_values = core.host_values(self.mask)
  local new_values = self.new_mask and core.host_values(self.new_mask)
  local shown = math.min(n, MAX_DRAWN)
  local columns, widths = {}, {}
  for i = 0, shown - 1 do
    local label = 'sample ' .. i
    columns[i + 1] = { label = label, rows = grid_rows(self, i, mask_values, new_values) }
    widths[i + 1] = math.max(#label, self.w)
  end
  local lines = { header }
  local function line(cell)
    local parts = {}
    for i = 1, shown do
      local s = cell(columns[i])
      parts[i] = i < shown and s .. string.rep(' ', widths[i] - #s) or s
    end
    lines[#lines + 1] = table.concat(parts, '    ')
  end
  line(function(col) return col.label end)
  for y = 1, self.h do line(function(col) return col.rows[y] end) end
  if n > shown then lines[#lines + 1] = string.format('... and %d more', n - shown) end
  return table.concat(lines, '\n')
end

-- ---- generators --------------------------------------------------------------------------------
local function grid_args(n, h, w, what)
  return check_integer(what, 'n', n, 0), check_integer(what, 'h', h, 0), check_integer(what, 'w', w, 0)
end

-- A mask tensor's h x w: from opts, else the square grid of its row length.
local function grid_of(t, opts, what)
  local l = t.shape[2]
  if opts.h or opts.w then
    local h, w = check_integer(what, 'h', opts.h, 0), check_integer(what, 'w', opts.w, 0)
    if h * w ~= l then error(string.format('%s: a %d x %d grid has %d patches, the mask has %d', what, h, w, h * w, l), 0) end
    return h, w
  end
  local side = math.floor(math.sqrt(l) + 0.5)
  if side * side ~= l then
    error(string.format('%s: a mask of %d patches is not a square grid; give opts.h and opts.w', what, l), 0)
  end
  return side, side
end

function masks.random(n, h, w, opts)
  local what = 'masks.random'
  opts = core.options(what, opts, { 'ratio', 'noise', 'generator', 'device' })
  n, h, w = grid_args(n, h, w, what)
  local ratio = check_number(what, 'ratio', opts.ratio or 0.75)
  local t
  if opts.noise ~= nil then
    if opts.device ~= nil then
      error(what .. ": give noise or device, not both (the mask is made on the noise's device)", 0)
    end
    local noise = handle(opts.noise, what)
    local shape = core.shape_of(noise)
    if #shape ~= 2 or shape[1] ~= n or shape[2] ~= h * w then
      error(string.format('%s: noise must be [%d, %d], got [%s]', what, n, h * w, table.concat(shape, ', ')), 0)
    end
    t = wrap(C.ts_mask_from_noise(noise, ratio))
  else
    t = wrap(C.ts_mask_generate(C.TS_MASK_RANDOM, n, h, w, ratio, generator_handle(opts.generator, what),
      core.device(opts.device, what)))
  end
  return new_mask { mask = t, h = h, w = w, strategy = 'random', ratio = ratio }
end

local function group_strategy(kind, strategy)
  local what = 'masks.' .. strategy
  return function(n, h, w, opts)
    opts = core.options(what, opts, { 'ratio', 'generator', 'device' })
    n, h, w = grid_args(n, h, w, what)
    local ratio = check_number(what, 'ratio', opts.ratio or 0.75)
    local t = wrap(C.ts_mask_generate(kind, n, h, w, ratio, generator_handle(opts.generator, what),
      core.device(opts.device, what)))
    return new_mask { mask = t, h = h, w = w, strategy = strategy, ratio = 0.75 }
  end
end
masks.grid = group_strategy(C.TS_MASK_GRID, 'grid')
masks.uniform = group_strategy(C.TS_MASK_UNIFORM, 'uniform')

-- SimMIM's MaskGenerator defaults: 192 px input, 32 px mask patches, 4 px model patches, 60%.
function masks.simmim(n, opts)
  local what = 'masks.simmim'
  opts = core.options(what, opts,
    { 'input_size', 'mask_patch_size', 'model_patch_size', 'ratio', 'generator', 'device' })
  n = check_integer(what, 'n', n, 0)
  local input = check_integer(what, 'input_size', opts.input_size or 192, 0)
  local mask_patch = check_integer(what, 'mask_patch_size', opts.mask_patch_size or 32, 0)
  local model_patch = check_integer(what, 'model_patch_size', opts.model_patch_size or 4, 0)
  local ratio = check_number(what, 'ratio', opts.ratio or 0.6)
  local t = wrap(C.ts_mask_simmim(n, input, mask_patch, model_patch, ratio, generator_handle(opts.generator, what),
    core.device(opts.device, what)))
  local side = model_patch > 0 and math.floor(input / model_patch) or 0
  return new_mask { mask = t, h = side, w = side, strategy = 'simmim', ratio = ratio,
    mask_patch_size = mask_patch, model_patch_size = model_patch }
end

local formulas = { swin = C.TS_SECONDARY_SWIN, pvt = C.TS_SECONDARY_SWIN, vit = C.TS_SECONDARY_VIT }

-- Secondary masking of a Mask (or a uint8/bool mask tensor [N, L] with opts.h/opts.w, or a square
-- grid). Returns a new Mask that shares the primary mask and adds new_mask and vis_mask.
function masks.secondary(m, opts)
  local what = 'masks.secondary'
  opts = core.options(what, opts, { 'ratio', 'noise', 'formula', 'generator', 'h', 'w' })
  local base
  if is_mask(m) then
    base = m
  elseif core.is_tensor(m) then
    if #m.shape ~= 2 then error(string.format('%s: mask must be [N, L], got [%s]', what, table.concat(m.shape, ', ')), 0) end
    local h, w = grid_of(m, opts, what)
    base = { mask = m, h = h, w = w, strategy = 'custom' }
  else
    error(string.format('%s: expected a Mask or a mask tensor, got %s', what, type(m)), 0)
  end
  local formula = opts.formula or 'swin'
  local id = formulas[formula]
  if id == nil then error(string.format("%s: formula must be 'swin' or 'vit', got %s", what, tostring(formula)), 0) end
  local ratio = check_number(what, 'ratio', opts.ratio or 0.25)
  local noise = opts.noise ~= nil and handle(opts.noise, what) or nil
  local out_new, out_vis = ffi.new('ts_tensor*[1]'), ffi.new('ts_tensor*[1]')
  check(C.ts_mask_secondary(handle(base.mask, what), noise, ratio, id, generator_handle(opts.generator, what),
    out_new, out_vis))
  local result = core.merge(base)
  result.new_mask, result.vis_mask = wrap(out_new[0]), wrap(out_vis[0])
  result.secondary_ratio, result.formula = ratio, formula
  return new_mask(result)
end

-- UM-MAE's full recipe: uniform sampling, then secondary masking of a share `ratio` of the kept
-- patches (the swin formula by default; 'vit' for the ViT model).
function masks.uniform_masking(n, h, w, opts)
  local what = 'masks.uniform_masking'
  opts = core.options(what, opts, { 'ratio', 'noise', 'formula', 'generator', 'device' })
  local us = masks.uniform(n, h, w, { generator = opts.generator, device = opts.device })
  local m = masks.secondary(us, { ratio = opts.ratio or 0.25, formula = opts.formula, noise = opts.noise,
    generator = opts.generator })
  m.strategy = 'uniform_masking'
  return m
end

-- ---- compaction --------------------------------------------------------------------------------
-- x [N, H, W, C] channels last; mask a Mask (its primary mask) or a uint8/bool tensor [N, L].
function T.uniform_compact(x, mask, patch_tokens)
  local what = 'uniform_compact'
  if is_mask(mask) then mask = mask.mask end
  return wrap(C.ts_uniform_compact(handle(x, what), handle(mask, what),
    check_integer(what, 'patch_tokens', patch_tokens, 0)))
end
masks.compact = T.uniform_compact

-- ---- pictures ----------------------------------------------------------------------------------
local IMAGENET_MEAN, IMAGENET_STD = data.IMAGENET_MEAN, data.IMAGENET_STD
local GREY, REMOVED_KEEP = 0.5, 0.25          -- removed patches: mostly grey, a trace of the image
local TINT, TINT_KEEP = { 0.15, 0.45, 0.95 }, 0.45  -- secondary-masked patches: tinted blue

-- The image as float32 [3, H, W] values in [0, 1] and its sides. Accepts float [3, H, W] (values in
-- [0, 1], or ImageNet-normalized with denormalize) and uint8 [H, W, 3|4] as read_png returns.
local function image_planes(img, opts, what)
  local shape = img.shape
  if img.dtype == 'uint8' and #shape == 3 and (shape[3] == 3 or shape[3] == 4) then
    img = T.image.to_tensor(img:narrow(2, 0, 3))
  elseif #shape ~= 3 or shape[1] ~= 3 or not img:is_floating_point() then
    error(string.format('%s: expected an image [3, H, W] (float) or [H, W, 3] (uint8), got %s [%s]', what, img.dtype,
      table.concat(shape, ', ')), 0)
  end
  img = img:to('cpu', 'float32') -- masked_pixels reads it through data_ptr, on the host
  if opts.denormalize then
    local std = T.tensor(IMAGENET_STD):view(3, 1, 1)
    local mean = T.tensor(IMAGENET_MEAN):view(3, 1, 1)
    img = img * std + mean
  end
  img = img:contiguous()
  return img, img.shape[2], img.shape[3]
end

-- One image of a mask (Mask object, or a tensor [L] / [N, L] on a square grid or opts.h x opts.w)
-- as Lua tables: removed[k], secondary[k] for patch k (0-based), and the grid sides.
local function mask_tables(m, index, opts, what)
  local mask_t, new_t, h, w
  if is_mask(m) then
    mask_t, new_t, h, w = m.mask, m.new_mask, m.h, m.w
  elseif core.is_tensor(m) then
    mask_t = #m.shape == 1 and m:view(1, -1) or m
    h, w = grid_of(mask_t, opts, what)
  else
    error(string.format('%s: expected a Mask or a mask tensor, got %s', what, type(m)), 0)
  end
  if index < 0 or index >= mask_t.shape[1] then
    error(string.format('%s: image index %d is out of range for %d masks', what, index, mask_t.shape[1]), 0)
  end
  local removed = core.host_values(mask_t:select(0, index))
  local secondary = new_t and core.host_values(new_t:select(0, index))
  return removed, secondary, h, w
end

-- A function (y, x) -> r, g, b of the masked picture.
local function masked_pixels(planes, hh, ww, removed, secondary, gh, gw, what)
  if hh % gh ~= 0 or ww % gw ~= 0 then
    error(string.format('%s: the %d x %d image does not split into the %d x %d patch grid of the mask', what, hh, ww,
      gh, gw), 0)
  end
  local ph, pw = hh / gh, ww / gw
  local px = ffi.cast('const float *', planes:data_ptr())
  local plane = hh * ww
  return function(y, x)
    local k = math.floor(y / ph) * gw + math.floor(x / pw)
    local o = y * ww + x
    local r, g, b = px[o], px[plane + o], px[2 * plane + o]
    if removed and removed[k] ~= 0 then
      return REMOVED_KEEP * r + (1 - REMOVED_KEEP) * GREY, REMOVED_KEEP * g + (1 - REMOVED_KEEP) * GREY,
        REMOVED_KEEP * b + (1 - REMOVED_KEEP) * GREY
    elseif secondary and secondary[k] ~= 0 then
      return TINT_KEEP * r + (1 - TINT_KEEP) * TINT[1], TINT_KEEP * g + (1 - TINT_KEEP) * TINT[2],
        TINT_KEEP * b + (1 - TINT_KEEP) * TINT[3]
    end
    return r, g, b
  end
end

local GAP = 2  -- white pixels between panels

-- Writes a PNG of the image shown under each mask side by side (the UM-MAE paper's Fig. 4):
-- removed patches greyed out, secondary-masked ones tinted blue, 2-pixel white gaps, a label under
-- every panel. masks: a Mask (or mask tensor) or a list of them. opts: labels (one per mask; the
-- defaults are the strategies), index (image of each mask, 0-based, default 0), original (true:
-- the unmasked image first), denormalize (undo ImageNet normalization). Returns the path.
function masks.render(path, img, mask_list, opts)
  local what = 'masks.render'
  opts = core.options(what, opts, { 'labels', 'denormalize', 'index', 'original', 'h', 'w' })
  core.check_string(what, 'path', path)
  if is_mask(mask_list) or core.is_tensor(mask_list) then mask_list = { mask_list } end
  if type(mask_list) ~= 'table' then error(what .. ': expected a Mask or a list of masks, got ' .. type(mask_list), 0) end
  local planes, hh, ww = image_planes(img, opts, what)
  local index = opts.index or 0
  local panels, labels = {}, opts.labels or {}
  if opts.original ~= false then
    panels[1] = { pixel = masked_pixels(planes, hh, ww, nil, nil, 1, 1, what), label = 'original' }
  end
  for i, m in ipairs(mask_list) do
    local removed, secondary, gh, gw = mask_tables(m, index, opts, what)
    local default = is_mask(m) and m.strategy:gsub('_', ' ') or ('mask ' .. i)
    panels[#panels + 1] = { pixel = masked_pixels(planes, hh, ww, removed, secondary, gh, gw, what),
      label = labels[i] ~= nil and tostring(labels[i]) or default }
  end
  local scale = math.max(1, math.floor(hh / 128))
  local strip = opts.labels == false and 0 or (Canvas.GLYPH_H + 4) * scale
  local canvas = Canvas.new(#panels * ww + (#panels - 1) * GAP, hh + strip)
  local byte = Canvas.byte
  for p, panel in ipairs(panels) do
    local x0 = (p - 1) * (ww + GAP)
    for y = 0, hh - 1 do
      for x = 0, ww - 1 do
        local r, g, b = panel.pixel(y, x)
        canvas:set(x0 + x, y, byte(r), byte(g), byte(b))
      end
    end
    if strip > 0 then canvas:text(panel.label, x0, hh + 2 * scale, scale, ww, 'center') end
  end
  canvas:save(path)
  return path, canvas.tensor
end

-- The masked image as 24-bit colour text: every character '▀' shows two pixel rows (foreground
-- the upper, background the lower), the image box-averaged down to opts.width columns (default
-- 64). mask: a Mask or a mask tensor; opts.index picks the image of a batch (0-based).
function masks.show_string(img, m, opts)
  local what = 'masks.show'
  opts = core.options(what, opts, { 'width', 'index', 'denormalize', 'h', 'w' })
  local planes, hh, ww = image_planes(img, opts, what)
  local removed, secondary, gh, gw = nil, nil, 1, 1
  if m ~= nil then removed, secondary, gh, gw = mask_tables(m, opts.index or 0, opts, what) end
  local pixel = masked_pixels(planes, hh, ww, removed, secondary, gh, gw, what)
  local cols = math.min(check_integer(what, 'width', opts.width or 64, 0), ww)
  if cols < 1 then error(what .. ': width must be at least 1', 0) end
  local rows = math.max(2, 2 * math.floor(cols * hh / ww / 2 + 0.5))
  local function average(oy, ox)
    local y0, y1 = math.floor(oy * hh / rows), math.max(math.floor(oy * hh / rows) + 1, math.floor((oy + 1) * hh / rows))
    local x0, x1 = math.floor(ox * ww / cols), math.max(math.floor(ox * ww / cols) + 1, math.floor((ox + 1) * ww / cols))
    local r, g, b = 0, 0, 0
    for y = y0, math.min(y1, hh) - 1 do
      for x = x0, math.min(x1, ww) - 1 do
        local pr, pg, pb = pixel(y, x)
        r, g, b = r + pr, g + pg, b + pb
      end
    end
    local n = (math.min(y1, hh) - y0) * (math.min(x1, ww) - x0)
    return Canvas.byte(r / n), Canvas.byte(g / n), Canvas.byte(b / n)
  end
  local lines = {}
  for line = 0, rows / 2 - 1 do
    local cells = {}
    for x = 0, cols - 1 do
      local ur, ug, ub = average(2 * line, x)
      local lr, lg, lb = average(2 * line + 1, x)
      cells[#cells + 1] = string.format('\27[38;2;%d;%d;%dm\27[48;2;%d;%d;%dm\226\150\128', ur, ug, ub, lr, lg, lb)
    end
    lines[#lines + 1] = table.concat(cells) .. '\27[0m'
  end
  return table.concat(lines, '\n') .. '\n'
end

function masks.show(img, m, opts)
  io.write(masks.show_string(img, m, opts))
end

T.masks = masks
return masks
