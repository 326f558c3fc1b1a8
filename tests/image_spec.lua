-- image_spec.lua — PNG reading and writing (T.image), the mask figure (T.masks.render) and the
-- terminal view (T.masks.show). PNG variants our writer does not produce (16-bit, palette, gray +
-- alpha, 1-bit, transparency) are built byte by byte here, with stored (uncompressed) zlib blocks.
local T = require 'tessera'
local S = require 'support'

local values = S.values

-- ---- a scratch directory -------------------------------------------------------------------------
local dir = S.tmpdir()
local function path(name) return dir .. '/' .. name end
local function write_file(name, bytes) return S.write_file(path(name), bytes) end
local read_file = S.read_file
local function listing() return S.list_dir(dir) end
teardown(function() os.execute('rm -rf ' .. dir) end)

-- ---- building PNG files --------------------------------------------------------------------------
local crc_table = {}
for i = 0, 255 do
  local c = i
  for _ = 1, 8 do c = bit.band(c, 1) ~= 0 and bit.bxor(0xEDB88320, bit.rshift(c, 1)) or bit.rshift(c, 1) end
  crc_table[i] = c
end
local function crc32(s)
  local c = 0xFFFFFFFF
  for i = 1, #s do c = bit.bxor(crc_table[bit.band(bit.bxor(c, s:byte(i)), 0xFF)], bit.rshift(c, 8)) end
  return bit.bnot(c)
end
local function be32(x)
  return string.char(bit.band(bit.rshift(x, 24), 255), bit.band(bit.rshift(x, 16), 255), bit.band(bit.rshift(x, 8), 255),
    bit.band(x, 255))
end
local function chunk(kind, data) return be32(#data) .. kind .. data .. be32(crc32(kind .. data)) end
local function zlib_stored(raw)
  local parts, pos = { '\120\1' }, 1
  repeat
    local piece = raw:sub(pos, pos + 65534)
    pos = pos + #piece
    local n = #piece
    parts[#parts + 1] = string.char(pos > #raw and 1 or 0, n % 256, math.floor(n / 256), 255 - n % 256,
      255 - math.floor(n / 256)) .. piece
  until pos > #raw
  local a, b = 1, 0
  for i = 1, #raw do
    a = (a + raw:byte(i)) % 65521
    b = (b + a) % 65521
  end
  parts[#parts + 1] = be32(b * 65536 + a)
  return table.concat(parts)
end
local SIGNATURE = '\137PNG\r\n\26\n'
-- rows: raw bytes of each row without the filter byte; extra: chunks between IHDR and IDAT
local function png(width, height, depth, color, rows, extra)
  local raw = {}
  for i, r in ipairs(rows) do raw[i] = '\0' .. r end
  return SIGNATURE .. chunk('IHDR', be32(width) .. be32(height) .. string.char(depth, color, 0, 0, 0)) .. (extra or '')
    .. chunk('IDAT', zlib_stored(table.concat(raw))) .. chunk('IEND', '')
end
local function bytes(list) return string.char(unpack(list)) end
local function u16(v) return string.char(math.floor(v / 256), v % 256) end

-- ---- reading ------------------------------------------------------------------------------------------
describe('T.image.read_png', function()
  it('reads 8-bit gray, RGB and RGBA with the stored channel count', function()
    local gray = T.image.read_png(write_file('g.png', png(3, 2, 8, 0, { bytes { 0, 128, 255 }, bytes { 1, 2, 3 } })))
    assert.same({ 2, 3, 1 }, gray.shape)
    assert.equal('uint8', gray.dtype)
    assert.same({ 0, 128, 255, 1, 2, 3 }, values(gray))
    local rgb = T.image.read_png(write_file('rgb.png', png(2, 1, 8, 2, { bytes { 1, 2, 3, 4, 5, 6 } })))
    assert.same({ 1, 2, 3 }, rgb.shape)
    assert.same({ 1, 2, 3, 4, 5, 6 }, values(rgb))
    local rgba = T.image.read_png(write_file('rgba.png', png(1, 1, 8, 6, { bytes { 9, 8, 7, 6 } })))
    assert.same({ 1, 1, 4 }, rgba.shape)
    assert.same({ 9, 8, 7, 6 }, values(rgba))
  end)

  it('scales 16-bit samples to 8 bits (v * 255 / 65535, rounded)', function()
    local samples = { 0, 65535, 32896, 4660, 257, 128 }
    local rgb = T.image.read_png(write_file('rgb16.png', png(2, 1, 16, 2, { table.concat(
      { u16(samples[1]), u16(samples[2]), u16(samples[3]), u16(samples[4]), u16(samples[5]), u16(samples[6]) }) })))
    assert.same({ 1, 2, 3 }, rgb.shape)
    local expected = {}
    for i, v in ipairs(samples) do expected[i] = math.floor(v * 255 / 65535 + 0.5) end
    assert.same(expected, values(rgb))
    local gray = T.image.read_png(write_file('g16.png', png(1, 1, 16, 0, { u16(65535) })))
    assert.same({ 1, 1, 1 }, gray.shape)
    assert.same({ 255 }, values(gray))
  end)

  it('expands gray + alpha to RGBA and 1-bit gray to 0..255', function()
    local ga = T.image.read_png(write_file('ga.png', png(2, 1, 8, 4, { bytes { 10, 200, 30, 40 } })))
    assert.same({ 1, 2, 4 }, ga.shape)
    assert.same({ 10, 10, 10, 200, 30, 30, 30, 40 }, values(ga))
    local bits = T.image.read_png(write_file('g1.png', png(8, 1, 1, 0, { bytes { 0xA1 } })))
    assert.same({ 1, 8, 1 }, bits.shape)
    assert.same({ 255, 0, 255, 0, 0, 0, 0, 255 }, values(bits))
  end)

  it('expands palettes to RGB, or RGBA when they carry transparency', function()
    local plte = chunk('PLTE', bytes { 255, 0, 0, 0, 255, 0, 0, 0, 255 })
    local p = T.image.read_png(write_file('p.png', png(3, 1, 8, 3, { bytes { 2, 0, 1 } }, plte)))
    assert.same({ 1, 3, 3 }, p.shape)
    assert.same({ 0, 0, 255, 255, 0, 0, 0, 255, 0 }, values(p))
    local trns = chunk('tRNS', bytes { 0, 128 })
    local pa = T.image.read_png(write_file('pa.png', png(3, 1, 8, 3, { bytes { 2, 0, 1 } }, plte .. trns)))
    assert.same({ 1, 3, 4 }, pa.shape)
    assert.same({ 0, 0, 255, 255, 255, 0, 0, 0, 0, 255, 0, 128 }, values(pa))
  end)

  it('turns a transparent gray colour (tRNS) into RGBA', function()
    local g = T.image.read_png(write_file('gt.png', png(2, 1, 8, 0, { bytes { 7, 9 } }, chunk('tRNS', u16(7)))))
    assert.same({ 1, 2, 4 }, g.shape)
    assert.same({ 7, 7, 7, 0, 9, 9, 9, 255 }, values(g))
  end)

  it('names the file in clear errors for missing, non-PNG, truncated and corrupt files', function()
    S.assert_error(function() T.image.read_png(path('missing.png')) end, 'png_read', 'missing.png', 'cannot open')
    S.assert_error(function() T.image.read_png(write_file('text.png', 'hello, this is not an image')) end,
      'text.png', 'is not a PNG file', 'no PNG signature')
    S.assert_error(function() T.image.read_png(write_file('empty.png', '')) end, 'is not a PNG file', 'shorter')
    local good = png(4, 4, 8, 2, { string.rep('\1', 12), string.rep('\2', 12), string.rep('\3', 12), string.rep('\4', 12) })
    for _, cut in ipairs { 12, 30, #good - 30, #good - 5 } do
      S.assert_error(function() T.image.read_png(write_file('cut.png', good:sub(1, cut))) end, 'cut.png',
        'truncated')
    end
    local idat = good:find('IDAT', 1, true)
    local length = good:byte(idat - 2) * 256 + good:byte(idat - 1)
    local crc_at = idat + 4 + length  -- the first byte of the IDAT chunk's CRC
    local bad_crc = good:sub(1, crc_at - 1) .. string.char((good:byte(crc_at) + 1) % 256) .. good:sub(crc_at + 1)
    S.assert_error(function() T.image.read_png(write_file('crc.png', bad_crc)) end, 'crc.png', 'corrupt', 'CRC')
    local bad_zlib = SIGNATURE .. chunk('IHDR', be32(2) .. be32(2) .. string.char(8, 0, 0, 0, 0))
      .. chunk('IDAT', 'this is not zlib data') .. chunk('IEND', '')
    S.assert_error(function() T.image.read_png(write_file('zlib.png', bad_zlib)) end, 'zlib.png', 'corrupt')
    local bad_header = SIGNATURE .. chunk('IHDR', be32(0) .. be32(2) .. string.char(8, 0, 0, 0, 0)) .. chunk('IEND', '')
    S.assert_error(function() T.image.read_png(write_file('hdr.png', bad_header)) end, 'hdr.png', 'corrupt')
    S.assert_error(function() T.image.read_png(42) end, 'read_png: path must be a string')
  end)
end)

-- ---- writing ------------------------------------------------------------------------------------------
describe('T.image.write_png', function()
  local function random_bytes(shape, seed)
    local n = 1
    for _, s in ipairs(shape) do n = n * s end
    local flat = S.randoms(n, seed, 0, 256)
    for i = 1, n do flat[i] = math.floor(flat[i]) end
    return T.tensor(S.nest(flat, shape), { dtype = 'uint8' }), flat
  end

  it('round-trips uint8 images of 1, 3 and 4 channels, and [H, W] as gray', function()
    for _, c in ipairs { 1, 3, 4 } do
      local img, flat = random_bytes({ 5, 7, c }, c)
      local p = T.image.write_png(path('rt' .. c .. '.png'), img)
      local back = T.image.read_png(p)
      assert.same({ 5, 7, c }, back.shape)
      assert.same(flat, values(back))
    end
    local img, flat = random_bytes({ 3, 4 }, 9)
    local back = T.image.read_png(T.image.write_png(path('hw.png'), img))
    assert.same({ 3, 4, 1 }, back.shape)
    assert.same(flat, values(back))
  end)

  it('writes float images in [0, 1]: clamped, times 255, rounded to nearest', function()
    local img = T.tensor({ { { -0.5, 0, 0.5 }, { 1, 1.7, 0.2 } } }, { dtype = 'float64' })
    local back = T.image.read_png(T.image.write_png(path('f.png'), img))
    assert.same({ 1, 2, 3 }, back.shape)
    assert.same({ 0, 0, 128, 255, 255, 51 }, values(back))
    local chw = T.rand({ 3, 6, 5 }, { generator = T.Generator(1) })
    local hwc = T.image.to_image(chw)
    assert.is_false(hwc:is_contiguous())
    local round = T.image.read_png(T.image.write_png(path('nc.png'), hwc))
    S.assert_close(T.image.to_tensor(round), chw, 0, 0.5 / 255 + 1e-7)
  end)

  it('replaces the file atomically and leaves no temporary file behind', function()
    local p = path('atomic.png')
    T.image.write_png(p, T.zeros({ 2, 2, 3 }, { dtype = 'uint8' }))
    local before = read_file(p)
    T.image.write_png(p, T.full({ 4, 4, 3 }, 200, { dtype = 'uint8' }))
    assert.same({ 4, 4, 3 }, T.image.read_png(p).shape)
    S.assert_error(function() T.image.write_png(p, T.zeros({ 2, 2, 2 }, { dtype = 'uint8' })) end, 'C = 1, 3 or 4')
    assert.are_not.equal(before, read_file(p))
    assert.same({ 4, 4, 3 }, T.image.read_png(p).shape)
    for _, name in ipairs(listing()) do assert.is_nil(name:find('.tmp', 1, true), 'temporary file left: ' .. name) end
  end)

  it('reports unwritable paths without leaving files', function()
    local before = listing()
    S.assert_error(function() T.image.write_png(path('no/such/dir/x.png'), T.zeros({ 1, 1, 1 }, { dtype = 'uint8' })) end,
      'png_write', 'cannot create', 'No such file or directory')
    os.execute('mkdir -p ' .. path('a_directory'))
    S.assert_error(function() T.image.write_png(path('a_directory'), T.zeros({ 1, 1, 1 }, { dtype = 'uint8' })) end,
      'png_write', 'cannot move the finished file', 'a_directory')
    before[#before + 1] = 'a_directory'
    table.sort(before)
    assert.same(before, listing())
  end)

  it('rejects bad dtypes, shapes and arguments', function()
    S.assert_error(function() T.image.write_png(path('x.png'), T.zeros({ 2, 2, 3 }, { dtype = 'int64' })) end,
      'png_write', 'uint8 (0..255) or floating point (0..1)', 'int64')
    S.assert_error(function() T.image.write_png(path('x.png'), T.zeros({ 3, 2, 2, 1 }, { dtype = 'uint8' })) end,
      '[H, W, C]', '[3,2,2,1]')
    S.assert_error(function() T.image.write_png(path('x.png'), T.zeros({ 0, 2, 3 }, { dtype = 'uint8' })) end,
      '1 to 2^31-1 pixels')
    S.assert_error(function() T.image.write_png(nil, T.zeros(1, 1)) end, 'write_png: path must be a string')
  end)
end)

-- ---- the mask figure ----------------------------------------------------------------------------------
describe('T.masks.render', function()
  -- a [3, 16, 16] image whose pixel (y, x) is (y/16, x/16, 0.5)
  local function test_image()
    local ys = T.arange(16, { dtype = 'float32' }):view(1, 16, 1):expand(1, 16, 16) / 16
    local xs = T.arange(16, { dtype = 'float32' }):view(1, 1, 16):expand(1, 16, 16) / 16
    return T.cat({ ys, xs, T.full({ 1, 16, 16 }, 0.5) }, 0)
  end
  local function byte(v) return math.floor(math.max(0, math.min(1, v)) * 255 + 0.5) end
  local function pixel(img, y, x)
    local v = values(img:select(0, y):select(0, x))
    return { v[1], v[2], v[3] }
  end

  it('shows the image under each mask side by side, with gaps and labels', function()
    local img = test_image()
    local us = T.masks.uniform(1, 2, 2, { generator = T.Generator(3) })
    local um = T.masks.secondary(us, { ratio = 0.25 }) -- K = int(1 * 0.75) = 0: the kept patch is tinted
    local p, out = T.masks.render(path('fig.png'), img, { us, um }, { labels = { 'US', 'UM' } })
    local back = T.image.read_png(p)
    assert.same(out.shape, back.shape)
    assert.same({ 16 + 11, 3 * 16 + 2 * 2, 3 }, back.shape)
    local kept = 0
    local mv = values(us.mask)
    for k = 1, 4 do if mv[k] == 0 then kept = k - 1 end end
    for _, spot in ipairs { { 0, 0 }, { 3, 12 }, { 9, 5 }, { 15, 15 } } do
      local y, x = spot[1], spot[2]
      local orig = { byte(y / 16), byte(x / 16), byte(0.5) }
      assert.same(orig, pixel(back, y, x))                             -- the original
      local patch = math.floor(y / 8) * 2 + math.floor(x / 8)
      local r, g, b = y / 16, x / 16, 0.5
      local shown = patch == kept and orig or { byte(0.25 * r + 0.375), byte(0.25 * g + 0.375), byte(0.25 * b + 0.375) }
      assert.same(shown, pixel(back, y, 18 + x))                       -- under US
      local under_um = patch == kept and { byte(0.45 * r + 0.55 * 0.15), byte(0.45 * g + 0.55 * 0.45),
        byte(0.45 * b + 0.55 * 0.95) } or shown
      assert.same(under_um, pixel(back, y, 36 + x))                    -- under UM: tinted
    end
    for y = 0, 15 do
      for _, x in ipairs { 16, 17, 34, 35 } do assert.same({ 255, 255, 255 }, pixel(back, y, x)) end
    end
    -- the label strip is white except for the letters, which are black
    local dark = { 0, 0, 0 }
    for p0 = 0, 2 do
      local seen = 0
      for y = 16, 26 do
        for x = p0 * 18, p0 * 18 + 15 do
          local v = pixel(back, y, x)
          if v[1] == 0 then seen = seen + 1; assert.same(dark, v) else assert.same({ 255, 255, 255 }, v) end
        end
      end
      assert.is_true(seen > 5, 'no label under panel ' .. p0)
    end
  end)

  it('undoes ImageNet normalization and accepts uint8 [H, W, 3] images', function()
    local img = test_image()
    local m = T.masks.grid(1, 4, 4, { generator = T.Generator(1) })
    local mean = T.tensor({ 0.485, 0.456, 0.406 }):view(3, 1, 1)
    local std = T.tensor({ 0.229, 0.224, 0.225 }):view(3, 1, 1)
    local _, plain = T.masks.render(path('a.png'), img, m, { labels = false })
    local _, denorm = T.masks.render(path('b.png'), (img - mean) / std, m, { labels = false, denormalize = true })
    assert.same({ 16, 34, 3 }, plain.shape)
    local diff = (plain:to('int64') - denorm:to('int64')):abs():amax():item()
    assert.is_true(diff <= 1)
    local bytes_img = T.image.read_png(path('a.png')):narrow(1, 0, 16)
    local _, again = T.masks.render(path('c.png'), bytes_img, m, { labels = false, original = false })
    assert.same({ 16, 16, 3 }, again.shape)
  end)

  it('rejects images that do not match the mask grid', function()
    local m = T.masks.uniform(1, 2, 2)
    S.assert_error(function() T.masks.render(path('x.png'), T.rand(3, 15, 16), m) end, 'masks.render',
      '15 x 16 image does not split into the 2 x 2 patch grid')
    S.assert_error(function() T.masks.render(path('x.png'), T.rand(4, 16, 16), m) end, 'expected an image [3, H, W]')
    S.assert_error(function() T.masks.render(path('x.png'), T.rand(3, 16, 16), m, { index = 1 }) end,
      'image index 1 is out of range for 1 masks')
  end)
end)

-- ---- the terminal view --------------------------------------------------------------------------------
describe('T.masks.show', function()
  local HALF_BLOCK = '\226\150\128'

  local function lines_of(s)
    assert.equal('\n', s:sub(-1))
    local lines = {}
    for l in s:gmatch('([^\n]*)\n') do lines[#lines + 1] = l end
    return lines
  end

  it('draws two pixel rows per line with 24-bit colours, downsampled to the width', function()
    local img = T.rand({ 3, 16, 32 }, { generator = T.Generator(2) })
    local m = T.masks.uniform_masking(1, 4, 8, { generator = T.Generator(3) })
    local s = T.masks.show_string(img, m, { width = 16 })
    local lines = lines_of(s)
    assert.equal(4, #lines) -- 16 columns: 8 pixel rows of the 2:1 image
    for _, l in ipairs(lines) do
      local _, cells = l:gsub(HALF_BLOCK, '')
      assert.equal(16, cells)
      local _, colours = l:gsub('\27%[38;2;%d+;%d+;%d+m\27%[48;2;%d+;%d+;%d+m' .. HALF_BLOCK, '')
      assert.equal(16, colours)
      assert.equal('\27[38;2;', l:sub(1, 7))
      assert.equal('\27[0m', l:sub(-4))
    end
    assert.equal(8, #lines_of(T.masks.show_string(img, m)))  -- default 64 columns, clipped to 32: 16 rows
  end)

  it('shows removed patches in grey', function()
    local img = T.full({ 3, 8, 8 }, 0.2)
    local cell = '\27[38;2;108;108;108m\27[48;2;108;108;108m' .. HALF_BLOCK  -- 0.25 * 0.2 + 0.75 * 0.5
    local s = T.masks.show_string(img, T.ones({ 1, 4 }, { dtype = 'uint8' }), { width = 4 })
    assert.equal(string.rep(string.rep(cell, 4) .. '\27[0m\n', 2), s)
    local plain = T.masks.show_string(img, nil, { width = 2 })
    assert.equal(string.rep('\27[38;2;51;51;51m\27[48;2;51;51;51m' .. HALF_BLOCK, 2) .. '\27[0m\n', plain)
  end)

  it('prints with show()', function()
    local written = {}
    local original = io.write
    io.write = function(...) for _, v in ipairs { ... } do written[#written + 1] = v end end
    local ok, err = pcall(T.masks.show, T.full({ 3, 4, 4 }, 1.0), T.masks.grid(1, 2, 2), { width = 2 })
    io.write = original
    assert(ok, err)
    assert.equal(1, #lines_of(table.concat(written)))
  end)
end)
