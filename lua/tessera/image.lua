-- tessera.image — PNG files as uint8 [H, W, C] tensors, through libpng (T.image).
--   T.image.read_png(path)          uint8 [H, W, C], C = 1 (gray), 3 (RGB) or 4 (RGBA); gray + alpha and
--                                   transparent palettes come back as RGBA, 16-bit samples as 8-bit
--   T.image.write_png(path, img)    uint8 [H, W, C] or float [H, W, C] in [0, 1] (C = 1, 3, 4; [H, W]
--                                   is gray); written to a temporary file and renamed (atomic)
--   T.image.to_tensor(img)          uint8 [H, W, C] -> float32 [C, H, W] in [0, 1] (torchvision's ToTensor)
--   T.image.to_image(t)             float [C, H, W] -> [H, W, C], ready for write_png
local core = require 'tessera.core'
local C, T = core.C, core.T
local wrap, handle, check = core.wrap, core.handle, core.check

local image = {}

function image.read_png(path)
  return wrap(C.ts_png_read(core.check_string('read_png', 'path', path)))
end

-- Returns the path, so that a caller can chain it into a log line.
function image.write_png(path, img)
  core.check_string('write_png', 'path', path)
  check(C.ts_png_write(path, handle(img, 'write_png')))
  return path
end

function image.to_tensor(img)
  local h = handle(img, 'to_tensor')
  if C.ts_ndim(h) ~= 3 or C.ts_dtype_of(h) ~= C.TS_U8 then
    error(string.format('to_tensor: expected a uint8 [H, W, C] image, got %s [%s]', img.dtype,
      table.concat(img.shape, ', ')), 0)
  end
  return img:permute(2, 0, 1):to('float32') / 255
end

function image.to_image(t)
  local h = handle(t, 'to_image')
  if C.ts_ndim(h) ~= 3 then
    error(string.format('to_image: expected a [C, H, W] tensor, got %d dims', C.ts_ndim(h)), 0)
  end
  return t:permute(1, 2, 0)
end

T.image = image
return image
