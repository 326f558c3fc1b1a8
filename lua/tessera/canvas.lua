-- tessera.canvas — a small RGB drawing surface for the figures tessera writes (mask panels,
-- loss curves, reconstruction grids): pixels, rectangles, lines, 5x7 bitmap text, saved as PNG.
local T = require 'tessera.core'.T
local ffi = require 'ffi'

local Canvas = {}
Canvas.__index = Canvas

-- A w x h canvas filled with the colour {r, g, b} (bytes, default white).
function Canvas.new(w, h, colour)
  colour = colour or { 255, 255, 255 }
  local self = setmetatable({ w = w, h = h }, Canvas)
  self.tensor = T.zeros({ h, w, 3 }, { dtype = 'uint8' })
  for c = 1, 3 do self.tensor:select(2, c - 1):fill_(colour[c]) end
  self.px = ffi.cast('uint8_t *', self.tensor:data_ptr())
  return self
end

function Canvas.byte(v)
  if v ~= v or v <= 0 then return 0 end
  if v >= 1 then return 255 end
  return math.floor(v * 255 + 0.5)
end

-- Sets a pixel from bytes; points outside the canvas are ignored.
function Canvas:set(x, y, r, g, b)
  x, y = math.floor(x), math.floor(y)
  if x < 0 or y < 0 or x >= self.w or y >= self.h then return end
  local o = (y * self.w + x) * 3
  self.px[o], self.px[o + 1], self.px[o + 2] = r, g, b
end

function Canvas:rect(x0, y0, w, h, colour)
  for y = y0, y0 + h - 1 do
    for x = x0, x0 + w - 1 do self:set(x, y, colour[1], colour[2], colour[3]) end
  end
end

-- A line from (x0, y0) to (x1, y1), `width` pixels thick (Bresenham).
function Canvas:line(x0, y0, x1, y1, colour, width)
  x0, y0, x1, y1 = math.floor(x0 + 0.5), math.floor(y0 + 0.5), math.floor(x1 + 0.5), math.floor(y1 + 0.5)
  local dx, dy = math.abs(x1 - x0), -math.abs(y1 - y0)
  local sx, sy = x0 < x1 and 1 or -1, y0 < y1 and 1 or -1
  local err, half = dx + dy, math.floor((width or 1) / 2)
  while true do
    self:rect(x0 - half, y0 - half, width or 1, width or 1, colour)
    if x0 == x1 and y0 == y1 then return end
    local e2 = 2 * err
    if e2 >= dy then err = err + dy; x0 = x0 + sx end
    if e2 <= dx then err = err + dx; y0 = y0 + sy end
  end
end

-- Copies a float image [3, H, W] (values in [0, 1]) with its top-left corner at (x0, y0).
function Canvas:blit(img, x0, y0)
  img = img:to('cpu', 'float32'):contiguous() -- read through data_ptr, on the host
  local h, w = img:size(1), img:size(2)
  local src = ffi.cast('const float *', img:data_ptr())
  local plane, byte = h * w, Canvas.byte
  for y = 0, h - 1 do
    for x = 0, w - 1 do
      local o = y * w + x
      self:set(x0 + x, y0 + y, byte(src[o]), byte(src[plane + o]), byte(src[2 * plane + o]))
    end
  end
end

-- A 5x7 bitmap font (rows top down, bit 4 = leftmost column); lower case is drawn in capitals,
-- characters outside it as '?'.
local FONT = {
  ['0'] = '0E11131519110E', ['1'] = '040C040404040E', ['2'] = '0E11010204081F',
  ['3'] = '1F02040201110E', ['4'] = '02060A121F0202', ['5'] = '1F101E0101110E',
  ['6'] = '0608101E11110E', ['7'] = '1F010204080808', ['8'] = '0E11110E11110E',
  ['9'] = '0E11110F01020C', A = '0E1111111F1111', B = '1E11111E11111E', C = '0E11101010110E',
  D = '1C12111111121C', E = '1F10101E10101F', F = '1F10101E101010', G = '0E11101711110F',
  H = '1111111F111111', I = '0E04040404040E', J = '0702020202120C', K = '11121418141211',
  L = '1010101010101F', M = '111B1515111111', N = '11111915131111', O = '0E11111111110E',
  P = '1E11111E101010', Q = '0E11111115120D', R = '1E11111E141211', S = '0F10100E01011E',
  T = '1F040404040404', U = '1111111111110E', V = '11111111110A04', W = '1111111515150A',
  X = '11110A040A1111', Y = '1111110A040404', Z = '1F01020408101F', [' '] = '00000000000000',
  ['.'] = '00000000000C0C', [','] = '000000000C0408', ['-'] = '0000001F000000', ['_'] = '0000000000001F',
  [':'] = '000C0C000C0C00', ['('] = '02040808080402', [')'] = '08040202020408', ['%'] = '18190204081303',
  ['/'] = '00010204081000', ['+'] = '0004041F040400', ['='] = '00001F001F0000', ['?'] = '0E110102040004',
  ['#'] = '0A0A1F0A1F0A0A', ["'"] = '04040800000000',
}
Canvas.GLYPH_W, Canvas.GLYPH_H = 5, 7

local function glyph_rows(ch)
  local code = FONT[ch] or FONT[ch:upper()] or FONT['?']
  local rows = {}
  for r = 1, Canvas.GLYPH_H do rows[r] = tonumber(code:sub(2 * r - 1, 2 * r), 16) end
  return rows
end

-- Width in pixels of `text` at `scale`.
function Canvas.text_width(text, scale)
  return #text * (Canvas.GLYPH_W + 1) * scale - scale
end

-- Draws `text` in black with its top-left corner at (x0, y0); align = 'center' centres it in
-- [x0, x0 + width) and cuts it at that width.
function Canvas:text(text, x0, y0, scale, width, align)
  scale = scale or 1
  local advance = (Canvas.GLYPH_W + 1) * scale
  if width then
    text = text:sub(1, math.max(0, math.floor((width + scale) / advance)))
    if align == 'center' then x0 = x0 + math.floor((width - Canvas.text_width(text, scale)) / 2) end
  end
  for i = 1, #text do
    local rows = glyph_rows(text:sub(i, i))
    for r = 1, Canvas.GLYPH_H do
      for c = 0, Canvas.GLYPH_W - 1 do
        if bit.band(rows[r], bit.lshift(1, Canvas.GLYPH_W - 1 - c)) ~= 0 then
          self:rect(x0 + (i - 1) * advance + c * scale, y0 + (r - 1) * scale, scale, scale, { 0, 0, 0 })
        end
      end
    end
  end
end

function Canvas:save(path)
  T.image.write_png(path, self.tensor)
  return path
end

return Canvas
