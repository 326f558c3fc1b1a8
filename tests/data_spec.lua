-- data_spec.lua — datasets, the pre-training augmentation and the threaded loader (T.data).
-- Images are made here: JPEGs through T.data.write_jpeg, PNGs through T.image.write_png, IDX files
-- byte by byte (gzipped through zlib). Fashion-MNIST (Debian's dataset-fashion-mnist) is checked
-- when installed.
local each = require 'tessera.each'
local T = require 'tessera'
local S = require 'support'
local ffi = require 'ffi'

ffi.cdef [[
  int dup(int fd);
  int dup2(int oldfd, int newfd);
  int open(const char *path, int flags, ...);
  int close(int fd);
  int fflush(void *stream);
  unsigned int geteuid(void);
  typedef struct gzFile_s *gzFile;
  gzFile gzopen(const char *path, const char *mode);
  int gzwrite(gzFile file, const void *buf, unsigned len);
  int gzclose(gzFile file);
]]
local zlib = ffi.load('z')

-- ---- helpers -----------------------------------------------------------------------------------
local dir = os.tmpname()
os.remove(dir)
assert(os.execute('mkdir -p ' .. dir) == 0)
teardown(function() os.execute('rm -rf ' .. dir) end)
local function path(name) return dir .. '/' .. name end
local function mkdir(p) assert(os.execute("mkdir -p '" .. p .. "'") == 0) end
local write_file = S.write_file
local read_file = S.read_file

-- The raw bytes of a tensor (contiguous), for bit-for-bit comparisons.
local function bytes_of(t)
  local c = t:contiguous()
  return ffi.string(c:data_ptr(), c:numel() * ({ float32 = 4, int64 = 8, uint8 = 1 })[c.dtype])
end
local function u8_values(t)
  local c = t:contiguous()
  local p = ffi.cast('const uint8_t *', c:data_ptr())
  local out = {}
  for i = 0, c:numel() - 1 do out[i + 1] = p[i] end
  return out
end
local function i64_values(t)
  local out = {}
  for i, v in ipairs(t:totable()) do out[i] = v end
  return out
end

-- A smooth colour image with some noise, float [H, W, 3] in [0, 1]: photograph-like for JPEG.
local function picture(h, w, seed, noise_level)
  local r = S.randoms(6, seed, 1, 5)
  local xs, ys = T.linspace(0, 1, w):view(1, w, 1), T.linspace(0, 1, h):view(h, 1, 1)
  local fx, fy = T.tensor({ r[1], r[2], r[3] }):view(1, 1, 3), T.tensor({ r[4], r[5], r[6] }):view(1, 1, 3)
  local noise = T.tensor(S.nest(S.randoms(h * w * 3, seed + 1, -(noise_level or 0.1), noise_level or 0.1), { h, w, 3 })):to('float32')
  return (((xs * fx + ys * fy) * 6.2832):sin() * 0.35 + 0.5 + noise):clamp(0, 1)
end

-- Runs fn with stderr sent to a file; returns fn's results and the lines written.
local function capture_stderr(fn)
  local log = path('stderr.log')
  io.stderr:flush()
  ffi.C.fflush(nil)
  local saved = ffi.C.dup(2)
  local O_WRONLY, O_CREAT, O_TRUNC = 1, 64, 512
  local lfd = ffi.C.open(log, O_WRONLY + O_CREAT + O_TRUNC, ffi.new('int', 420)) -- 0644
  assert(lfd >= 0, 'cannot open ' .. log)
  ffi.C.dup2(lfd, 2)
  ffi.C.close(lfd)
  local results = { pcall(fn) }
  ffi.C.fflush(nil)
  ffi.C.dup2(saved, 2)
  ffi.C.close(saved)
  if not results[1] then error(results[2], 0) end
  local lines = {}
  for l in read_file(log):gmatch('[^\n]+') do lines[#lines + 1] = l end
  return lines, unpack(results, 2)
end

-- Every batch of one epoch: images/labels/indices as byte strings and index lists.
local function epoch_batches(loader, epoch)
  if epoch then loader:set_epoch(epoch) end
  local out = {}
  for images, labels, indices in loader:iter() do
    out[#out + 1] = { images = bytes_of(images), labels = i64_values(labels), indices = i64_values(indices),
      n = images.shape[1], shape = images.shape }
  end
  return out
end

-- ---- a small ImageFolder -------------------------------------------------------------------------
-- classes ant (2 JPEG + nested dir), bee (PNG, upper-case extension), cat (JPEG, gray JPEG); a
-- text file that is ignored.
local folder = path('folder')
local folder_files = {
  { 'ant/b.jpg', 0 }, { 'ant/a.jpeg', 0 }, { 'ant/sub/z.jpg', 0 }, { 'ant/sub-x/y.jpg', 0 },
  { 'bee/one.PNG', 1 }, { 'bee/two.png', 1 },
  { 'cat/c1.jpg', 2 }, { 'cat/c2.jpg', 2 }, { 'cat/gray.jpg', 2 },
}
-- torchvision's order: sorted(os.walk) — by directory path ('' < 'sub' < 'sub-x'), then names.
local folder_order = { 'ant/a.jpeg', 'ant/b.jpg', 'ant/sub/z.jpg', 'ant/sub-x/y.jpg', 'bee/one.PNG', 'bee/two.png',
  'cat/c1.jpg', 'cat/c2.jpg', 'cat/gray.jpg' }
do
  for _, d in ipairs { 'ant/sub', 'ant/sub-x', 'bee', 'cat' } do mkdir(folder .. '/' .. d) end
  for k, f in ipairs(folder_files) do
    local img = picture(40 + 7 * k, 60 - 3 * k, 100 + k)
    if f[1]:find('gray') then
      T.data.write_jpeg(folder .. '/' .. f[1], img:select(2, 0):contiguous())
    elseif f[1]:lower():find('%.png$') then
      T.image.write_png(folder .. '/' .. f[1], img)
    else
      T.data.write_jpeg(folder .. '/' .. f[1], img)
    end
  end
  write_file(folder .. '/ant/notes.txt', 'not an image')
end

describe('T.data.ImageFolder', function()
  it('sorts classes by name and files as torchvision does', function()
    local d = T.data.ImageFolder(folder)
    assert.are.same({ 'ant', 'bee', 'cat' }, d.classes)
    assert.are.equal(#folder_order, d:size())
    for i, rel in ipairs(folder_order) do
      assert.are.equal(folder .. '/' .. rel, d:path(i - 1))
      assert.are.equal(({ ant = 0, bee = 1, cat = 2 })[rel:match('^(%a+)/')], d:label(i - 1))
    end
  end)

  it('decodes every sample to uint8 [H, W, 3], gray replicated', function()
    local d = T.data.ImageFolder(folder)
    for i = 0, d:size() - 1 do
      local img = d:image(i)
      assert.are.equal('uint8', img.dtype)
      assert.are.equal(3, img.shape[3])
    end
    local gray = d:image(8)
    assert.are.equal(bytes_of(gray:select(2, 0)), bytes_of(gray:select(2, 1)))
    assert.are.equal(bytes_of(gray:select(2, 0)), bytes_of(gray:select(2, 2)))
  end)

  it('reports missing roots, empty roots and empty classes', function()
    S.assert_error(function() T.data.ImageFolder(path('nowhere')) end, 'data_open', 'nowhere', 'not a directory')
    mkdir(path('empty_root'))
    S.assert_error(function() T.data.ImageFolder(path('empty_root')) end, 'no class folder')
    mkdir(path('empty_class/a'))
    S.assert_error(function() T.data.ImageFolder(path('empty_class')) end, "empty_class/a' has no .jpg")
    S.assert_error(function() T.data.ImageFolder(3) end, 'ImageFolder', 'root must be a string')
  end)
end)

describe('T.data.FileList', function()
  it('reads `path label` lines relative to the root, comments and blank lines skipped', function()
    local list = write_file(path('train.txt'), table.concat({
      '# IN1K style', 'ant/b.jpg 4', '', '  cat/c1.jpg\t7  ', folder .. '/bee/two.png 0' }, '\r\n'))
    local d = T.data.FileList(folder, list)
    assert.are.equal(3, d:size())
    assert.are.equal(folder .. '/ant/b.jpg', d:path(0))
    assert.are.equal(folder .. '/cat/c1.jpg', d:path(1))
    assert.are.equal(folder .. '/bee/two.png', d:path(2))
    assert.are.same({ 4, 7, 0 }, { d:label(0), d:label(1), d:label(2) })
    assert.are.equal(8, #d.classes)
    assert.are.equal('7', d.classes[8])
  end)

  it('names the file and line of a bad entry', function()
    local bad = write_file(path('bad.txt'), 'ant/b.jpg 1\nant/a.jpeg\n')
    S.assert_error(function() T.data.FileList(folder, bad) end, 'bad.txt', 'line 2', '<relative path> <label>')
    local neg = write_file(path('neg.txt'), 'ant/b.jpg -1\n')
    S.assert_error(function() T.data.FileList(folder, neg) end, 'line 1', "label '-1'")
    S.assert_error(function() T.data.FileList(folder, path('missing.txt')) end, 'cannot open', 'missing.txt')
    local empty = write_file(path('empty.txt'), '# nothing\n')
    S.assert_error(function() T.data.FileList(folder, empty) end, 'lists no image')
  end)
end)

-- ---- IDX -------------------------------------------------------------------------------------------
local function be32(x)
  return string.char(bit.band(bit.rshift(x, 24), 255), bit.band(bit.rshift(x, 16), 255),
    bit.band(bit.rshift(x, 8), 255), bit.band(x, 255))
end
local function idx_images(n, h, w)
  local px = {}
  for i = 0, n * h * w - 1 do px[#px + 1] = string.char((i * 37 + 11) % 256) end
  return '\0\0\8\3' .. be32(n) .. be32(h) .. be32(w) .. table.concat(px)
end
local function idx_labels(labels)
  local b = {}
  for i, l in ipairs(labels) do b[i] = string.char(l) end
  return '\0\0\8\1' .. be32(#labels) .. table.concat(b)
end
local function write_gz(p, bytes)
  local f = zlib.gzopen(p, 'wb')
  assert(f ~= nil)
  assert(zlib.gzwrite(f, bytes, #bytes) == #bytes)
  zlib.gzclose(f)
  return p
end

describe('T.data.IDX', function()
  local images = write_file(path('im.idx'), idx_images(5, 4, 3))
  local labels = write_gz(path('lb.idx.gz'), idx_labels { 3, 1, 4, 1, 5 })

  it('parses big-endian headers, gzipped or not, gray images replicated to RGB', function()
    local d = T.data.IDX(images, labels)
    assert.are.equal(5, d:size())
    assert.are.same({ 3, 1, 4, 1, 5 }, { d:label(0), d:label(1), d:label(2), d:label(3), d:label(4) })
    assert.are.equal(6, #d.classes)
    local img = d:image(2)
    assert.are.same({ 4, 3, 3 }, img.shape)
    local v = u8_values(img)
    for p = 0, 11 do
      local expect = ((2 * 12 + p) * 37 + 11) % 256
      assert.are.same({ expect, expect, expect }, { v[3 * p + 1], v[3 * p + 2], v[3 * p + 3] })
    end
    local gz = T.data.IDX(write_gz(path('im.idx.gz'), idx_images(5, 4, 3)), labels)
    assert.are.equal(bytes_of(d:image(4)), bytes_of(gz:image(4)))
  end)

  it('validates magic numbers, counts and lengths', function()
    S.assert_error(function() T.data.IDX(labels, labels) end, 'not a valid IDX file', 'expected 0x00000803')
    S.assert_error(function() T.data.IDX(images, images) end, 'expected 0x00000801')
    local short = write_file(path('short.idx'), idx_images(5, 4, 3):sub(1, -2))
    S.assert_error(function() T.data.IDX(short, labels) end, 'truncated')
    -- a corrupt header announcing 2^39 bytes: the few bytes there are read, nothing near that allocated
    local huge = write_file(path('huge.idx'), '\0\0\8\3' .. be32(8192) .. be32(8192) .. be32(8192) .. 'abc')
    S.assert_error(function() T.data.IDX(huge, labels) end, 'truncated')
    -- 2^31 x 512 x 2^31: the running product would pass 2^64 (and wrap) before a check after it
    local absurd = write_file(path('absurd.idx'), '\0\0\8\3' .. be32(2 ^ 31) .. be32(512) .. be32(2 ^ 31) .. 'abc')
    S.assert_error(function() T.data.IDX(absurd, labels) end, 'absurd dimensions')
    local long = write_file(path('long.idx'), idx_images(5, 4, 3) .. 'x')
    S.assert_error(function() T.data.IDX(long, labels) end, 'bytes after the data')
    local four = write_file(path('four.idx'), idx_labels { 1, 2, 3, 4 })
    S.assert_error(function() T.data.IDX(images, four) end, 'holds 5 images', '4 labels')
    S.assert_error(function() T.data.IDX(path('none.idx'), labels) end, 'cannot open', 'none.idx')
  end)

  local fmnist = '/usr/share/datasets/fashion-mnist/'
  local have_fmnist = io.open(fmnist .. 't10k-images-idx3-ubyte.gz') ~= nil
  local fit = have_fmnist and it or pending
  fit('loads Fashion-MNIST (dataset-fashion-mnist) when installed', function()
    local d = T.data.IDX(fmnist .. 't10k-images-idx3-ubyte.gz', fmnist .. 't10k-labels-idx1-ubyte.gz')
    assert.are.equal(10000, d:size())
    assert.are.equal(10, #d.classes)
    local counts = {}
    for i = 0, d:size() - 1 do counts[d:label(i)] = (counts[d:label(i)] or 0) + 1 end
    for c = 0, 9 do assert.are.equal(1000, counts[c]) end -- the test set is balanced
    assert.are.same({ 28, 28, 3 }, d:image(0).shape)
    local loader = T.data.Loader(d, { batch_size = 100, image_size = 32, num_workers = 2 })
    local images, labels, indices = loader:next()
    assert.are.same({ 100, 3, 32, 32 }, images.shape)
    for k, i in ipairs(i64_values(indices)) do assert.are.equal(d:label(i), labels[k - 1]:item()) end
  end)
end)

-- ---- single images -----------------------------------------------------------------------------------
describe('T.data.decode and write_jpeg', function()
  it('round-trips a JPEG closely and a PNG exactly', function()
    local img = picture(120, 160, 5, 0) -- 4:2:0 chroma needs room: tiny colourful images lose more
    local jpg = T.data.write_jpeg(path('rt.jpg'), img, { quality = 95 })
    local back = T.data.decode(jpg)
    assert.are.same({ 120, 160, 3 }, back.shape)
    local err = (back:to('float32') / 255 - img):abs():mean():item()
    assert.is_true(err < 0.01, 'JPEG round trip mean error ' .. err)
    T.image.write_png(path('rt.png'), img)
    assert.are.equal(bytes_of(T.image.read_png(path('rt.png'))), bytes_of(T.data.decode(path('rt.png'))))
  end)

  it('drops alpha and replicates gray as PIL convert("RGB")', function()
    local rgba = (T.cat({ picture(9, 11, 6), T.full({ 9, 11, 1 }, 0.5) }, 2) * 255):round():to('uint8')
    T.image.write_png(path('rgba.png'), rgba)
    assert.are.equal(bytes_of(rgba:narrow(2, 0, 3)), bytes_of(T.data.decode(path('rgba.png'))))
    local gray = (picture(9, 11, 7):select(2, 0) * 255):round():to('uint8')
    T.image.write_png(path('gray.png'), gray)
    local rgb = T.data.decode(path('gray.png'))
    for c = 0, 2 do assert.are.equal(bytes_of(gray), bytes_of(rgb:select(2, c))) end
  end)

  it('reports unreadable, empty, foreign and truncated files', function()
    S.assert_error(function() T.data.decode(path('none.jpg')) end, 'data_decode', 'none.jpg', 'cannot open')
    S.assert_error(function() T.data.decode(write_file(path('zero.jpg'), '')) end, 'empty file')
    S.assert_error(function() T.data.decode(write_file(path('text.jpg'), 'hello')) end, 'not a JPEG or PNG')
    local whole = read_file(T.data.write_jpeg(path('whole.jpg'), picture(64, 64, 8)))
    S.assert_error(function() T.data.decode(write_file(path('half.jpg'), whole:sub(1, math.floor(#whole / 2)))) end,
      'corrupt or truncated JPEG', 'Premature end')
  end)

  it('rejects bad JPEG writes', function()
    S.assert_error(function() T.data.write_jpeg(path('q.jpg'), picture(4, 4, 1), { quality = 0 }) end, 'quality')
    S.assert_error(function() T.data.write_jpeg(path('q.jpg'), T.zeros(4, 4, 2)) end, 'C = 1 or 3')
    S.assert_error(function() T.data.write_jpeg(path('q.jpg'), T.zeros(4, 4, 3), { qualty = 9 }) end,
      "write_jpeg: unknown option 'qualty'", 'valid: quality')
  end)
end)

-- ---- the augmentation ----------------------------------------------------------------------------------
-- Pillow's Image.resize(BICUBIC) in plain Lua: cubic kernel a = -0.5, support 2 stretched by the
-- downscaling factor, weights normalized then rounded to 22-bit fixed point, horizontal pass over
-- the rows the vertical pass reads, 8-bit rounding after each pass.
local PREC = 2 ^ 22
local function cubic(x)
  x = math.abs(x)
  if x < 1 then return (1.5 * x - 2.5) * x * x + 1 end
  if x < 2 then return (((x - 5) * x + 8) * x - 4) * -0.5 end
  return 0
end
local function trunc(x) return x < 0 and math.ceil(x) or math.floor(x) end
local function taps(in_size, out_size)
  local scale = in_size / out_size
  local fs = math.max(scale, 1)
  local support, ss = 2 * fs, 1 / fs
  local out = {}
  for xx = 0, out_size - 1 do
    local center = (xx + 0.5) * scale
    local xmin = math.max(trunc(center - support + 0.5), 0)
    local n = math.min(trunc(center + support + 0.5), in_size) - xmin
    local w, sum = {}, 0
    for x = 0, n - 1 do
      w[x] = cubic((x + xmin - center + 0.5) * ss)
      sum = sum + w[x]
    end
    local k = {}
    for x = 0, n - 1 do
      local v = sum ~= 0 and w[x] / sum or w[x]
      k[x] = v < 0 and trunc(-0.5 + v * PREC) or trunc(0.5 + v * PREC)
    end
    out[xx] = { xmin = xmin, n = n, k = k }
  end
  return out
end
local function clip8(s) return math.min(255, math.max(0, math.floor(s / PREC))) end
-- img[y][x][c] (0-based tables of 0..255) -> resized the same way.
local function pil_bicubic(img, h, w, oh, ow)
  local vt = taps(h, oh)
  local first, last = vt[0].xmin, vt[oh - 1].xmin + vt[oh - 1].n
  local src, offset = img, 0
  if ow ~= w then
    local ht = taps(w, ow)
    src, offset = {}, first
    for y = first, last - 1 do
      local row = {}
      for xx = 0, ow - 1 do
        local t, px = ht[xx], {}
        for c = 0, 2 do
          local s = PREC / 2
          for x = 0, t.n - 1 do s = s + img[y][t.xmin + x][c] * t.k[x] end
          px[c] = clip8(s)
        end
        row[xx] = px
      end
      src[y - first] = row
    end
  end
  if oh == h then
    local out = {}
    for y = 0, oh - 1 do out[y] = src[y - offset + offset] end
    return out
  end
  local out = {}
  for yy = 0, oh - 1 do
    local t, row = vt[yy], {}
    for xx = 0, ow - 1 do
      local px = {}
      for c = 0, 2 do
        local s = PREC / 2
        for y = 0, t.n - 1 do s = s + src[t.xmin - offset + y][xx][c] * t.k[y] end
        px[c] = clip8(s)
      end
      row[xx] = px
    end
    out[yy] = row
  end
  return out
end

local function as_table(u8, h, w)
  local v, img = u8_values(u8), {}
  for y = 0, h - 1 do
    img[y] = {}
    for x = 0, w - 1 do
      local p = (y * w + x) * 3
      img[y][x] = { [0] = v[p + 1], v[p + 2], v[p + 3] }
    end
  end
  return img
end

-- resized_crop without normalization, back to 0..255 per [y][x][c].
local function resized_values(img, crop, oh, ow)
  local out = T.data.resized_crop(img, crop, { size = { oh, ow }, normalize = false })
  assert.are.same({ 3, oh, ow }, out.shape)
  local v = out:permute(1, 2, 0):contiguous():totable()
  local res = {}
  for y = 0, oh - 1 do
    res[y] = {}
    for x = 0, ow - 1 do
      res[y][x] = {}
      for c = 0, 2 do res[y][x][c] = math.floor(v[y + 1][x + 1][c + 1] * 255 + 0.5) end
    end
  end
  return res
end

describe('T.data.resized_crop', function()
  local h, w = 13, 17
  local img = (picture(h, w, 21) * 255):round():to('uint8')
  local ref_img = as_table(img, h, w)

  it("matches Pillow's antialiased bicubic resize bit for bit", function()
    local sizes = { { 5, 7 }, { 13, 6 }, { 4, 17 }, { 26, 40 }, { 9, 9 }, { 1, 1 }, { 13, 17 } }
    for _, s in ipairs(sizes) do
      local got = resized_values(img, { top = 0, left = 0, height = h, width = w }, s[1], s[2])
      local want = pil_bicubic(ref_img, h, w, s[1], s[2])
      for y = 0, s[1] - 1 do
        for x = 0, s[2] - 1 do
          for c = 0, 2 do
            assert(got[y][x][c] == want[y][x][c], string.format('%dx%d: pixel (%d, %d, %d) is %d, Pillow gives %d',
              s[1], s[2], y, x, c, got[y][x][c], want[y][x][c]))
          end
        end
      end
    end
  end)

  it('crops before resizing (no pixel outside the crop contributes)', function()
    local crop = { top = 3, left = 5, height = 7, width = 9 }
    local sub = img:narrow(0, 3, 7):narrow(1, 5, 9)
    local whole = { top = 0, left = 0, height = 7, width = 9 }
    assert.are.equal(bytes_of(T.data.resized_crop(sub, whole, { size = 4 })),
      bytes_of(T.data.resized_crop(img, crop, { size = 4 })))
  end)

  it('mirrors left-right when flip is set', function()
    local crop = { top = 1, left = 2, height = 10, width = 12 }
    local plain = T.data.resized_crop(img, crop, { size = 6 })
    crop.flip = true
    local flipped = T.data.resized_crop(img, crop, { size = 6 })
    for x = 0, 5 do
      assert.are.equal(bytes_of(plain:narrow(2, x, 1)), bytes_of(flipped:narrow(2, 5 - x, 1)))
    end
    assert.are_not.equal(bytes_of(plain), bytes_of(flipped))
  end)

  it('normalizes a constant colour to the exact float32 constant', function()
    local colour = { 200, 100, 37 }
    local const = T.stack({ T.full({ 20, 30 }, colour[1]), T.full({ 20, 30 }, colour[2]), T.full({ 20, 30 }, colour[3]) },
      2):to('uint8')
    local out = T.data.resized_crop(const, { top = 2, left = 3, height = 15, width = 21 }, { size = 8 })
    local f = ffi.new('float[1]')
    local function f32(x) f[0] = x; return f[0] end
    local mean, std = T.data.IMAGENET_MEAN, T.data.IMAGENET_STD
    for c = 1, 3 do
      local want = f32(f32(f32(colour[c] / 255) - f32(mean[c])) / f32(std[c]))
      local plane = out:select(0, c - 1)
      assert.are.equal(want, plane:max():item())
      assert.are.equal(want, plane:min():item())
    end
  end)

  it('rejects bad crops and inputs', function()
    S.assert_error(function() T.data.resized_crop(img, { top = 10, left = 0, height = 5, width = 4 }) end,
      'data_resized_crop', 'is not inside')
    S.assert_error(function() T.data.resized_crop(img:to('float32'), { top = 0, left = 0, height = 5, width = 4 }) end,
      'expected a uint8')
    S.assert_error(function() T.data.resized_crop(img, { top = 0, left = 0, height = 5, width = 4 }, { std = { 1, 0, 1 } }) end,
      'std nonzero')
  end)
end)

describe('T.data.crop_params', function()
  it("keeps RandomResizedCrop's area and aspect bounds", function()
    local H, W, flips = 240, 320, 0
    for index = 0, 399 do
      local c = T.data.crop_params { height = H, width = W, seed = 3, epoch = 1, index = index }
      assert(c.top >= 0 and c.left >= 0 and c.top + c.height <= H and c.left + c.width <= W, 'crop inside the image')
      -- w = round(sqrt(A r)), h = round(sqrt(A / r)): within half a pixel of a crop in range
      local lo_area, hi_area = (c.width - 0.5) * (c.height - 0.5), (c.width + 0.5) * (c.height + 0.5)
      assert(hi_area >= 0.2 * H * W and lo_area <= H * W, 'area share ' .. c.width * c.height / (H * W))
      local lo_ratio, hi_ratio = (c.width - 0.5) / (c.height + 0.5), (c.width + 0.5) / (c.height - 0.5)
      assert(hi_ratio >= 3 / 4 and lo_ratio <= 4 / 3, 'aspect ' .. c.width / c.height)
      if c.flip then flips = flips + 1 end
    end
    assert(flips > 150 and flips < 250, 'flips ' .. flips .. ' of 400 with p = 0.5')
  end)

  it('falls back to the central crop clamped to the ratio range', function()
    local c = T.data.crop_params { height = 100, width = 400, scale = { 2, 3 }, ratio = { 0.5, 2 } }
    assert.are.same({ 0, 100, 100, 200 }, { c.top, c.left, c.height, c.width })
    c = T.data.crop_params { height = 90, width = 120, scale = { 5, 6 } }
    assert.are.same({ 0, 0, 90, 120 }, { c.top, c.left, c.height, c.width })
  end)

  it('draws from (seed, epoch, index) only', function()
    local a = T.data.crop_params { height = 50, width = 60, seed = 1, epoch = 2, index = 3 }
    assert.are.same(a, T.data.crop_params { height = 50, width = 60, seed = 1, epoch = 2, index = 3 })
    local differs = 0
    for _, p in ipairs { { seed = 2, epoch = 2, index = 3 }, { seed = 1, epoch = 3, index = 3 }, { seed = 1, epoch = 2, index = 4 } } do
      p.height, p.width = 50, 60
      local b = T.data.crop_params(p)
      if b.top ~= a.top or b.left ~= a.left or b.width ~= a.width or b.height ~= a.height then differs = differs + 1 end
    end
    assert.are.equal(3, differs)
  end)
end)

-- ---- the loader -------------------------------------------------------------------------------------------
-- 22 JPEGs of 150x200 in two classes (large enough for cropped and skipped JPEG decoding).
local big = path('big')
do
  mkdir(big .. '/a')
  mkdir(big .. '/b')
  for k = 1, 22 do
    T.data.write_jpeg(string.format('%s/%s/%02d.jpg', big, k % 2 == 0 and 'a' or 'b', k), picture(150, 200, 300 + k))
  end
end

describe('T.data.Loader', function()
  local dataset = T.data.ImageFolder(big)
  local base = { batch_size = 4, image_size = 24, seed = 11, drop_last = false }
  local function opts(extra)
    local o = {}
    for k, v in each(base) do o[k] = v end
    for k, v in each(extra or {}) do o[k] = v end
    return o
  end

  it('gives float32 [B, 3, S, S] images, int64 labels and indices, with the dataset labels', function()
    local loader = T.data.Loader(dataset, opts())
    assert.are.equal(6, #loader)
    assert.are.equal(6, loader:num_batches())
    local images, labels, indices = loader:next()
    assert.are.same({ 4, 3, 24, 24 }, images.shape)
    assert.are.equal('float32', images.dtype)
    assert.are.equal('int64', labels.dtype)
    for k, i in ipairs(i64_values(indices)) do assert.are.equal(dataset:label(i), labels[k - 1]:item()) end
    local seen, count = {}, 0
    for _, b in ipairs(epoch_batches(loader, 0)) do
      for _, i in ipairs(b.indices) do seen[i] = true; count = count + 1 end
    end
    assert.are.equal(22, count)
    for i = 0, 21 do assert.is_true(seen[i], 'sample ' .. i .. ' missing from the epoch') end
  end)

  it('is identical bit for bit whatever num_workers and prefetch', function()
    local reference = epoch_batches(T.data.Loader(dataset, opts { num_workers = 1 }), 2)
    for _, o in ipairs { { num_workers = 0 }, { num_workers = 2 }, { num_workers = 3, prefetch = 4 },
      { num_workers = 2, prefetch = 1 } } do
      local got = epoch_batches(T.data.Loader(dataset, opts(o)), 2)
      assert.are.equal(#reference, #got)
      for b = 1, #got do
        assert.are.same(reference[b].indices, got[b].indices)
        assert(reference[b].images == got[b].images, 'batch ' .. b .. ' differs with num_workers ' .. o.num_workers)
      end
    end
  end)

  it('differs between epochs and repeats an epoch exactly', function()
    local loader = T.data.Loader(dataset, opts())
    local e0, e1, again = epoch_batches(loader, 0), epoch_batches(loader, 1), epoch_batches(loader, 0)
    assert.are_not.same(e0[1].indices, e1[1].indices)
    assert.are_not.equal(e0[1].images, e1[1].images)
    for b = 1, #e0 do assert(e0[b].images == again[b].images) end
    local replay = epoch_batches(loader) -- iter() again without set_epoch replays epoch 0
    assert.are.equal(e0[1].images, replay[1].images)
  end)

  it('equals decoding the file and augmenting with crop_params (exact partial JPEG decode)', function()
    local o = opts { dct_scaling = false, scale = { 0.05, 0.5 } }
    local loader = T.data.Loader(dataset, o)
    local checked = 0
    for images, _, indices in loader:iter() do
      for k, i in ipairs(i64_values(indices)) do
        local img = dataset:image(i)
        local crop = T.data.crop_params { height = img.shape[1], width = img.shape[2], seed = o.seed, epoch = 0,
          index = i, scale = o.scale }
        local want = T.data.resized_crop(img, crop, { size = 24 })
        assert(bytes_of(images[k - 1]) == bytes_of(want), 'sample ' .. i .. ' differs from the reference')
        checked = checked + 1
      end
    end
    assert.are.equal(22, checked)
  end)

  it('decodes at a DCT-reduced scale close to the full decode', function()
    local o = opts { image_size = 16, scale = { 0.9, 1 } }
    local fast = T.data.Loader(dataset, o)
    o.dct_scaling = false
    local full = T.data.Loader(dataset, o)
    local a, b = fast:next(), full:next()
    local diff = (a - b):abs():mean():item()
    assert.is_true(diff > 0 and diff < 0.1, 'mean difference ' .. diff)
  end)

  it('shards epochs across ranks like DistributedSampler', function()
    local world, per_rank = 3, math.ceil(22 / 3)
    local counts = {}
    for rank = 0, world - 1 do
      local loader = T.data.Loader(dataset, opts { rank = rank, world_size = world, batch_size = 3 })
      assert.are.equal(per_rank, loader:num_samples())
      for _, b in ipairs(epoch_batches(loader, 5)) do
        for _, i in ipairs(b.indices) do counts[i] = (counts[i] or 0) + 1 end
      end
    end
    local total, twice = 0, 0
    for i = 0, 21 do
      assert.is_not_nil(counts[i], 'sample ' .. i .. ' on no rank')
      total = total + counts[i]
      if counts[i] == 2 then twice = twice + 1 end
    end
    assert.are.equal(per_rank * world, total)
    assert.are.equal(per_rank * world - 22, twice) -- the padding repeats the first samples once
  end)

  it('drops the incomplete last batch with drop_last', function()
    local loader = T.data.Loader(dataset, opts { drop_last = true, batch_size = 5 })
    assert.are.equal(4, #loader)
    for _, b in ipairs(epoch_batches(loader, 0)) do assert.are.equal(5, b.n) end
  end)

  it('resumes mid-epoch with exactly the remaining batches', function()
    local uninterrupted = epoch_batches(T.data.Loader(dataset, opts { num_workers = 2 }), 3)
    local first = T.data.Loader(dataset, opts { num_workers = 2 })
    first:set_epoch(3)
    first:next()
    first:next()
    local state = first:state()
    assert.are.same({ 3, 2, 11 }, { state.epoch, state.batch, state.seed })
    first:close()
    local resumed = T.data.Loader(dataset, opts { num_workers = 1, seed = 99 })
    resumed:load_state(state)
    local rest = epoch_batches(resumed)
    assert.are.equal(#uninterrupted - 2, #rest)
    for b = 1, #rest do assert(rest[b].images == uninterrupted[b + 2].images, 'resumed batch ' .. b .. ' differs') end
    S.assert_error(function() T.data.Loader(dataset, opts { batch_size = 3 }):load_state(state) end,
      'saved with batch_size = 4')
    S.assert_error(function() resumed:load_state { epoch = 0, batch = 99 } end, 'out of range')
  end)

  it('validates its options with clear messages', function()
    S.assert_error(function() T.data.Loader(dataset, { batch_sise = 4 }) end, "Loader: unknown option 'batch_sise'",
      'valid: batch_size', 'world_size')
    S.assert_error(function() T.data.Loader(dataset, { batch_size = 0 }) end, 'batch_size must be an integer >= 1')
    S.assert_error(function() T.data.Loader(dataset, { scale = { 1, 0.2 } }) end, 'scale must be (lo, hi)')
    S.assert_error(function() T.data.Loader(dataset, { ratio = { 0, 1 } }) end, 'ratio must be (lo, hi)')
    S.assert_error(function() T.data.Loader(dataset, { hflip = 2 }) end, 'hflip must be a probability')
    S.assert_error(function() T.data.Loader(dataset, { rank = 2, world_size = 2 }) end, 'rank must be in 0..world_size-1')
    S.assert_error(function() T.data.Loader(dataset, { mean = { 0.5, 0.5 } }) end, 'mean must be a list of 3 numbers')
    S.assert_error(function() T.data.Loader(dataset, { normalize = 1 }) end, 'normalize must be a boolean')
    S.assert_error(function() T.data.Loader(dataset, { prefetch = 0 }) end, 'prefetch must be an integer >= 1')
    S.assert_error(function() T.data.Loader({}, {}) end, 'expected a dataset')
    local loader = T.data.Loader(dataset, opts())
    loader:close()
    S.assert_error(function() loader:next() end, 'used after close')
  end)
end)

describe('T.data.Loader with bad files', function()
  local root = path('broken')
  mkdir(root .. '/x')
  local good = {}
  for k = 1, 8 do good[k] = T.data.write_jpeg(string.format('%s/x/good%d.jpg', root, k), picture(30, 40, 500 + k)) end
  local whole = read_file(good[1])
  local bad_files = {
    write_file(root .. '/x/zero.jpg', ''),
    write_file(root .. '/x/garbage.png', string.rep('garbage ', 50)),
    write_file(root .. '/x/truncated.jpg', whole:sub(1, math.floor(#whole * 0.6))),
    write_file(root .. '/x/notpng.png', '\137PNG\r\n\26\n' .. 'rest is broken'),
  }
  local unreadable = ffi.C.geteuid() ~= 0 -- root reads files whatever their permissions
  if unreadable then
    bad_files[#bad_files + 1] = T.data.write_jpeg(root .. '/x/locked.jpg', picture(8, 8, 1))
    assert(os.execute("chmod 000 '" .. bad_files[#bad_files] .. "'") == 0)
  end

  it('skips them with one warning each, counts them and keeps batches full', function()
    local dataset = T.data.ImageFolder(root)
    local n = dataset:size()
    local loader
    local lines, batches = capture_stderr(function()
      -- created inside the capture: the workers start decoding at once
      loader = T.data.Loader(dataset, { batch_size = 3, image_size = 16, num_workers = 2, drop_last = false, seed = 5 })
      return epoch_batches(loader, 0)
    end)
    local delivered = 0
    for b, batch in ipairs(batches) do
      delivered = delivered + batch.n
      if b < #batches then assert.are.equal(3, batch.n) end
      for _, i in ipairs(batch.indices) do
        assert.is_nil(dataset:path(i):find('zero') or dataset:path(i):find('garbage') or dataset:path(i):find('trunc'),
          'a bad file was delivered')
      end
    end
    assert.are.equal(n, delivered)
    assert.are.equal(#bad_files, loader:skipped())
    assert.are.equal(#bad_files, #lines)
    for _, p in ipairs(bad_files) do
      local found = false
      for _, l in ipairs(lines) do found = found or l:find(p, 1, true) ~= nil end
      assert.is_true(found, 'no warning names ' .. p)
    end
    -- the next epoch skips them again, silently, and the outcome is deterministic
    local again_lines, again = capture_stderr(function() return epoch_batches(loader, 0) end)
    assert.are.equal(0, #again_lines)
    assert.are.equal(#bad_files, loader:skipped())
    local _, other = capture_stderr(function()
      local fresh = T.data.Loader(dataset, { batch_size = 3, image_size = 16, num_workers = 0, drop_last = false, seed = 5 })
      return epoch_batches(fresh, 0)
    end)
    for b = 1, #again do
      assert.are.same(again[b].indices, other[b].indices)
      assert(again[b].images == other[b].images)
    end
  end)

  it('fails cleanly when no file of the shard decodes', function()
    mkdir(path('allbad/x'))
    write_file(path('allbad/x/a.jpg'), '')
    write_file(path('allbad/x/b.jpg'), 'nope')
    local lines = capture_stderr(function()
      local loader = T.data.Loader(T.data.ImageFolder(path('allbad')), { batch_size = 1, image_size = 8 })
      S.assert_error(function() loader:next() end, 'data_loader_next', 'could be decoded')
    end)
    assert.are.equal(2, #lines)
  end)
end)
