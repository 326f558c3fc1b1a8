-- tessera.spatial — image ops in T.F, with PyTorch's names, arguments and defaults:
--
--   T.F.conv2d(x, w, b, {stride = 1, padding = 0, dilation = 1, groups = 1})
--       padding may also be 'valid' (0) or 'same' (stride 1 only; odd total padding adds the
--       extra row/column at the bottom/right, as torch); b may be nil or left out.
--   T.F.avg_pool2d(x, kernel_size, {stride = kernel_size, padding = 0, ceil_mode = false,
--                                   count_include_pad = true})
--   T.F.max_pool2d(x, kernel_size, {stride = kernel_size, padding = 0, dilation = 1, ceil_mode = false})
--   T.F.adaptive_avg_pool2d(x, output_size)
--   T.F.interpolate(x, {size = , scale_factor = , mode = 'nearest' | 'bilinear', align_corners = ,
--                       recompute_scale_factor = })
--   T.F.pad(x, pad, {mode = 'constant', value = 0})      also T.F.pad(x, pad, 'constant', value)
--   t:roll(shifts, dims)   T.roll(t, shifts, dims)      dims nil: the flattened tensor
--   T.F.pixel_shuffle(x, upscale_factor)   T.F.pixel_unshuffle(x, downscale_factor)
--
-- Sizes, strides, paddings and dilations are an integer or an {h, w} pair. Images are [N, C, H, W]
-- (conv and pools also take unbatched [C, H, W]); every op is differentiable.
local core = require 'tessera.core'
local C, T, Tensor = core.C, core.T, core.Tensor
local wrap, handle = core.wrap, core.handle

T.F = T.F or {}
local F = T.F

-- ---- argument parsing --------------------------------------------------------------------------
local function is_options(x) return type(x) == 'table' and not core.is_tensor(x) end


-- An integer or an {h, w} pair of integers → h, w (default when nil).
local function pair(what, name, v, default)
  if v == nil then v = default end
  if type(v) == 'number' then
    core.int(v, what .. ': ' .. name)
    return v, v
  end
  if type(v) == 'table' and not core.is_tensor(v) and #v == 2 then
    return core.int(v[1], what .. ': ' .. name), core.int(v[2], what .. ': ' .. name)
  end
  error(string.format('%s: %s must be an integer or a pair {h, w} of integers, got %s', what, name,
    type(v) == 'table' and ('a table of ' .. #v) or tostring(v)), 0)
end

local check_boolean = core.check_boolean

-- ---- conv2d ------------------------------------------------------------------------------------
local conv_options = { 'stride', 'padding', 'dilation', 'groups' }

local function call_conv(x, w, b, sh, sw, ph, pw, dh, dw, groups)
  return wrap(C.ts_conv2d(handle(x, 'conv2d'), handle(w, 'conv2d'), b ~= nil and handle(b, 'conv2d') or nil,
    sh, sw, ph, pw, dh, dw, groups))
end

-- padding = 'same': torch's rule, dilation (k - 1) in total per dim, half before; an odd total
-- pads one more row/column after, through F.pad, and convolves with the symmetric part.
local function conv_same(x, w, b, sh, sw, dh, dw, groups)
  if sh ~= 1 or sw ~= 1 then
    error(string.format("conv2d: padding='same' is not supported for strided convolutions, got stride (%d, %d)", sh, sw), 0)
  end
  handle(w, 'conv2d')
  local wshape = w.shape
  if #wshape ~= 4 then
    error(string.format('conv2d: expected a 4-D weight [out_channels, in_channels/groups, kh, kw], got [%s]',
      table.concat(wshape, ',')), 0)
  end
  local th, tw = dh * (wshape[3] - 1), dw * (wshape[4] - 1)
  local ph, pw = math.floor(th / 2), math.floor(tw / 2)
  if th % 2 == 0 and tw % 2 == 0 then return call_conv(x, w, b, 1, 1, ph, pw, dh, dw, groups) end
  local padded = F.pad(x, { 0, tw - 2 * pw, 0, th - 2 * ph })
  return call_conv(padded, w, b, 1, 1, ph, pw, dh, dw, groups)
end

function F.conv2d(x, w, b, opts)
  if opts == nil and is_options(b) then b, opts = nil, b end
  opts = core.options('conv2d', opts, conv_options)
  local sh, sw = pair('conv2d', 'stride', opts.stride, 1)
  local dh, dw = pair('conv2d', 'dilation', opts.dilation, 1)
  local groups = core.int(opts.groups or 1, 'conv2d: groups')
  local padding = opts.padding
  if padding == 'same' then return conv_same(x, w, b, sh, sw, dh, dw, groups) end
  if padding == 'valid' then padding = 0 end
  if type(padding) == 'string' then
    error(string.format("conv2d: padding must be an integer, a pair, 'valid' or 'same', got '%s'", padding), 0)
  end
  local ph, pw = pair('conv2d', 'padding', padding, 0)
  return call_conv(x, w, b, sh, sw, ph, pw, dh, dw, groups)
end

-- ---- pooling -----------------------------------------------------------------------------------
local avg_options = { 'stride', 'padding', 'ceil_mode', 'count_include_pad' }
local max_options = { 'stride', 'padding', 'dilation', 'ceil_mode' }

function F.avg_pool2d(x, kernel_size, opts)
  opts = core.options('avg_pool2d', opts, avg_options)
  local kh, kw = pair('avg_pool2d', 'kernel_size', kernel_size)
  local sh, sw = pair('avg_pool2d', 'stride', opts.stride, { kh, kw })
  local ph, pw = pair('avg_pool2d', 'padding', opts.padding, 0)
  local ceil = check_boolean('avg_pool2d', 'ceil_mode', opts.ceil_mode, false)
  local include = check_boolean('avg_pool2d', 'count_include_pad', opts.count_include_pad, true)
  return wrap(C.ts_avg_pool2d(handle(x, 'avg_pool2d'), kh, kw, sh, sw, ph, pw, ceil and 1 or 0, include and 1 or 0))
end

function F.max_pool2d(x, kernel_size, opts)
  opts = core.options('max_pool2d', opts, max_options)
  local kh, kw = pair('max_pool2d', 'kernel_size', kernel_size)
  local sh, sw = pair('max_pool2d', 'stride', opts.stride, { kh, kw })
  local ph, pw = pair('max_pool2d', 'padding', opts.padding, 0)
  local dh, dw = pair('max_pool2d', 'dilation', opts.dilation, 1)
  local ceil = check_boolean('max_pool2d', 'ceil_mode', opts.ceil_mode, false)
  return wrap(C.ts_max_pool2d(handle(x, 'max_pool2d'), kh, kw, sh, sw, ph, pw, dh, dw, ceil and 1 or 0))
end

function F.adaptive_avg_pool2d(x, output_size)
  local oh, ow = pair('adaptive_avg_pool2d', 'output_size', output_size)
  return wrap(C.ts_adaptive_avg_pool2d(handle(x, 'adaptive_avg_pool2d'), oh, ow))
end

-- ---- interpolate -------------------------------------------------------------------------------
local interpolate_options = { 'size', 'scale_factor', 'mode', 'align_corners', 'recompute_scale_factor' }
local modes = { nearest = C.TS_INTERP_NEAREST, bilinear = C.TS_INTERP_BILINEAR }

-- A finite positive number or an {h, w} pair of them.
local function scale_pair(v)
  local function positive(s) return core.check_positive('interpolate', 'scale_factor', s) end
  if type(v) == 'table' and not core.is_tensor(v) and #v == 2 then return positive(v[1]), positive(v[2]) end
  if type(v) == 'table' then error('interpolate: scale_factor must be a number or a pair {h, w}', 0) end
  return positive(v), positive(v)
end

function F.interpolate(x, opts)
  opts = core.options('interpolate', opts, interpolate_options)
  local mode = opts.mode or 'nearest'
  if modes[mode] == nil then
    error(string.format("interpolate: unknown mode '%s' (valid: bilinear, nearest)", tostring(mode)), 0)
  end
  if opts.align_corners ~= nil and mode ~= 'bilinear' then
    error(string.format("interpolate: align_corners can only be set with the bilinear mode, not '%s'", mode), 0)
  end
  local align = check_boolean('interpolate', 'align_corners', opts.align_corners, false)
  local recompute = check_boolean('interpolate', 'recompute_scale_factor', opts.recompute_scale_factor, false)
  if (opts.size == nil) == (opts.scale_factor == nil) then
    error('interpolate: give exactly one of size and scale_factor', 0)
  end
  handle(x, 'interpolate')
  local shape = x.shape
  if #shape ~= 4 then
    error(string.format('interpolate: %s mode expects a 4-D input [N, C, H, W], got [%s]', mode,
      table.concat(shape, ',')), 0)
  end
  local oh, ow, sh, sw
  if opts.size ~= nil then
    oh, ow = pair('interpolate', 'size', opts.size)
    sh, sw = 0, 0
  else
    sh, sw = scale_pair(opts.scale_factor)
    oh, ow = math.floor(shape[3] * sh), math.floor(shape[4] * sw)
    if recompute then sh, sw = 0, 0 end -- map coordinates with in/out, as torch
  end
  return wrap(C.ts_interpolate(x.h, oh, ow, modes[mode], align and 1 or 0, sh, sw))
end

-- ---- pad, roll ---------------------------------------------------------------------------------
local pad_options = { 'mode', 'value' }

function F.pad(x, pad, opts, value)
  if type(opts) == 'string' then opts = { mode = opts, value = value } end
  opts = core.options('pad', opts, pad_options)
  if opts.mode ~= nil and opts.mode ~= 'constant' then
    error(string.format("pad: only mode 'constant' is supported, got '%s'", tostring(opts.mode)), 0)
  end
  if type(pad) ~= 'table' or core.is_tensor(pad) then
    error(string.format('pad: expected a list of paddings {left, right, top, bottom, ...}, got %s', type(pad)), 0)
  end
  local v = opts.value or 0
  if type(v) ~= 'number' then error(string.format('pad: value must be a number, got %s', type(v)), 0) end
  local arr, n = core.shape_array(pad, 'pad')
  return wrap(C.ts_pad(handle(x, 'pad'), n, arr, v))
end

-- An integer or a list of integers → int64_t[n] or int[n], n.
local function int_list(what, v, ctype)
  if type(v) == 'number' then v = { v } end
  if type(v) ~= 'table' or core.is_tensor(v) or #v == 0 then
    error(string.format('%s: expected an integer or a non-empty list of integers', what), 0)
  end
  local arr = core.ffi.new(ctype .. '[?]', #v)
  for i = 1, #v do arr[i - 1] = core.int(v[i], what) end
  return arr, #v
end

function Tensor.roll(t, shifts, dims)
  local h = handle(t, 'roll')
  local sarr, ns = int_list('roll: shifts', shifts, 'int64_t')
  if dims == nil then return wrap(C.ts_roll(h, ns, sarr, nil)) end
  local darr, nd = int_list('roll: dims', dims, 'int')
  if nd ~= ns then
    error(string.format('roll: shifts and dims must align, got %d shifts and %d dims', ns, nd), 0)
  end
  return wrap(C.ts_roll(h, ns, sarr, darr))
end
T.roll = Tensor.roll

-- ---- pixel_shuffle, pixel_unshuffle ------------------------------------------------------------
function F.pixel_shuffle(x, upscale_factor)
  return wrap(C.ts_pixel_shuffle(handle(x, 'pixel_shuffle'), core.int(upscale_factor, 'pixel_shuffle: upscale_factor')))
end

function F.pixel_unshuffle(x, downscale_factor)
  return wrap(C.ts_pixel_unshuffle(handle(x, 'pixel_unshuffle'),
    core.int(downscale_factor, 'pixel_unshuffle: downscale_factor')))
end

return T
