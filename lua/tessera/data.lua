-- tessera.data — image datasets and the pre-training loader (T.data), as MAE's main_pretrain.py
-- feeds its model: RandomResizedCrop(image_size, scale, ratio, bicubic) → RandomHorizontalFlip →
-- ToTensor → Normalize, decoded by C threads of their own while the model computes.
--
--   T.data.ImageFolder(root)              root/<class>/.../*.jpg|jpeg|png, classes sorted by name
--   T.data.FileList(root, list_file)      lines `relative/path label` (as IN1K's train.txt)
--   T.data.IDX(images_path, labels_path)  MNIST-style IDX files, gzipped or not (Fashion-MNIST)
--   dataset:size(), dataset.classes (1-based list of names; label k is classes[k + 1]),
--   dataset:label(i), dataset:path(i), dataset:image(i) (uint8 [H, W, 3]); i is 0-based
--
--   local loader = T.data.Loader(dataset, {batch_size = 64, image_size = 224, scale = {0.2, 1},
--       ratio = {3/4, 4/3}, hflip = 0.5, normalize = true, mean = {...}, std = {...}, seed = 0,
--       num_workers = 2, prefetch = 2, rank = 0, world_size = 1, drop_last = true, shuffle = true,
--       dct_scaling = true})
--   for epoch = 0, epochs - 1 do
--     loader:set_epoch(epoch)
--     for images, labels, indices in loader:iter() do ... end   -- float32 [B,3,S,S], int64 [B], int64 [B]
--   end
--   #loader / loader:num_batches(), loader:num_samples(), loader:state() / loader:load_state(s),
--   loader:skipped(), loader:next(), loader:close()
--
--   T.data.decode(path)                                   uint8 [H, W, 3] from a JPEG or PNG
--   T.data.write_jpeg(path, img, {quality = 90})         uint8 or [0, 1] float [H, W, C], C = 1 or 3
--   T.data.crop_params{height=, width=, seed=, epoch=, index=, scale=, ratio=, hflip=}
--                                                         the loader's crop of one sample
--   T.data.resized_crop(img, crop, {size =, normalize =, mean =, std =})
--                                                         the loader's augmentation with a given crop
-- Every random decision of a sample comes from Philox keyed by (seed, epoch, dataset index): the
-- batches are the same whatever num_workers, and a state saved mid-epoch resumes exactly. Files
-- that cannot be decoded are skipped with one warning line each (see tessera.h for the exact rule).
local core = require 'tessera.core'
local ffi, C, T = core.ffi, core.C, core.T
local wrap, handle, check = core.wrap, core.handle, core.check

local data = {}

ffi.cdef [[ typedef struct tessera_data_loader { ts_data_loader *h; } tessera_data_loader; ]]

-- ---- arguments -----------------------------------------------------------------------------------
local check_string, check_integer, check_number, check_boolean =
  core.check_string, core.check_integer, core.check_number, core.check_boolean

local function list_opt(v, n, what, name)
  if type(v) ~= 'table' or #v ~= n then
    error(string.format('%s: %s must be a list of %d numbers, got %s', what, name, n, core.describe(v)), 0)
  end
  for i = 1, n do check_number(what, name .. '[' .. i .. ']', v[i]) end
  return v
end

-- ---- datasets ------------------------------------------------------------------------------------
local Dataset = {}
Dataset.__index = Dataset
data.Dataset = Dataset

local function new_dataset(kind, a, b, what)
  local h = C.ts_data_open(kind, a, b)
  if h == nil then core.raise() end
  h = ffi.gc(h, C.ts_data_close)
  local classes = {}
  for i = 0, tonumber(C.ts_data_num_classes(h)) - 1 do classes[i + 1] = ffi.string(C.ts_data_class_name(h, i)) end
  return setmetatable({ h = h, kind = what, classes = classes }, Dataset)
end

function data.ImageFolder(root)
  return new_dataset(C.TS_DATA_IMAGE_FOLDER, check_string('ImageFolder', 'root', root), nil, 'ImageFolder')
end

function data.FileList(root, list_file)
  return new_dataset(C.TS_DATA_FILE_LIST, check_string('FileList', 'root', root),
    check_string('FileList', 'list_file', list_file), 'FileList')
end

function data.IDX(images_path, labels_path)
  return new_dataset(C.TS_DATA_IDX, check_string('IDX', 'images_path', images_path),
    check_string('IDX', 'labels_path', labels_path), 'IDX')
end

function data.is_dataset(x) return getmetatable(x) == Dataset end

function Dataset:size() return tonumber(C.ts_data_size(self.h)) end

local function sample_index(d, i, what)
  if not core.is_integer(i) or i < 0 or i >= d:size() then
    error(string.format('%s: index %s is out of range for a dataset of %d samples (indices are 0-based)', what,
      tostring(i), d:size()), 0)
  end
  return i
end

function Dataset:label(i) return tonumber(C.ts_data_label(self.h, sample_index(self, i, 'label'))) end
function Dataset:path(i) return ffi.string(C.ts_data_path(self.h, sample_index(self, i, 'path'))) end
function Dataset:image(i) return wrap(C.ts_data_image(self.h, sample_index(self, i, 'image'))) end

function Dataset:__tostring()
  return string.format('%s(%d samples, %d classes)', self.kind, self:size(), #self.classes)
end

-- ---- single images -------------------------------------------------------------------------------
function data.decode(path)
  return wrap(C.ts_data_decode(check_string('decode', 'path', path)))
end

function data.write_jpeg(path, img, opts)
  check_string('write_jpeg', 'path', path)
  opts = core.options('write_jpeg', opts, { quality = true })
  local quality = check_integer('write_jpeg', 'quality', opts.quality, 1, 90)
  check(C.ts_jpeg_write(path, handle(img, 'write_jpeg'), quality))
  return path
end

local IMAGENET_MEAN, IMAGENET_STD = { 0.485, 0.456, 0.406 }, { 0.229, 0.224, 0.225 }
data.IMAGENET_MEAN, data.IMAGENET_STD = IMAGENET_MEAN, IMAGENET_STD

local function pair(v, what, name) return ffi.new('double[2]', list_opt(v, 2, what, name)) end
local function triple(v, what, name) return ffi.new('double[3]', list_opt(v, 3, what, name)) end

local CROP_PARAM_KEYS = { height = true, width = true, seed = true, epoch = true, index = true, scale = true,
  ratio = true, hflip = true }

-- The crop the loader would take of sample `index` in `epoch` for an image of height x width.
function data.crop_params(p)
  local what = 'crop_params'
  p = core.options(what, p, CROP_PARAM_KEYS)
  local out = ffi.new('ts_data_crop')
  local seed, epoch = check_integer(what, 'seed', p.seed or 0, 0), check_integer(what, 'epoch', p.epoch or 0, 0)
  local index = check_integer(what, 'index', p.index or 0, 0)
  local height, width = check_integer(what, 'height', p.height, 1), check_integer(what, 'width', p.width, 1)
  check(C.ts_data_crop_params(seed, epoch, index, height, width, pair(p.scale or { 0.2, 1.0 }, what, 'scale'),
    pair(p.ratio or { 3 / 4, 4 / 3 }, what, 'ratio'), check_number(what, 'hflip', p.hflip or 0.5), out))
  return { top = tonumber(out.top), left = tonumber(out.left), height = tonumber(out.height),
    width = tonumber(out.width), flip = out.flip ~= 0 }
end

local function crop_struct(crop, what)
  if type(crop) ~= 'table' then error(what .. ': crop must be a table {top, left, height, width, flip}', 0) end
  local c = ffi.new('ts_data_crop')
  c.top, c.left = check_integer(what, 'crop.top', crop.top, 0), check_integer(what, 'crop.left', crop.left, 0)
  c.height = check_integer(what, 'crop.height', crop.height, 1)
  c.width = check_integer(what, 'crop.width', crop.width, 1)
  c.flip = crop.flip and 1 or 0
  return c
end

-- The loader's augmentation of one uint8 [H, W, C] image with an explicit crop: float32 [3, S, S].
function data.resized_crop(img, crop, opts)
  local what = 'resized_crop'
  opts = core.options(what, opts, { size = true, normalize = true, mean = true, std = true })
  local size = opts.size or 224
  local h_, w_
  if type(size) == 'table' then h_, w_ = size[1], size[2] else h_, w_ = size, size end
  local normalize = check_boolean(what, 'normalize', opts.normalize, true)
  return wrap(C.ts_data_resized_crop(handle(img, what), crop_struct(crop, what), check_integer(what, 'size', h_, 1),
    check_integer(what, 'size', w_, 1), normalize and 1 or 0, triple(opts.mean or IMAGENET_MEAN, what, 'mean'),
    triple(opts.std or IMAGENET_STD, what, 'std')))
end

-- ---- the loader ----------------------------------------------------------------------------------
local Loader = {}
data.Loader_methods = Loader

local LOADER_DEFAULTS = {
  batch_size = 64, image_size = 224, scale = { 0.2, 1.0 }, ratio = { 3 / 4, 4 / 3 }, hflip = 0.5, normalize = true,
  mean = IMAGENET_MEAN, std = IMAGENET_STD, seed = 0, num_workers = 2, prefetch = 2, rank = 0, world_size = 1,
  drop_last = true, shuffle = true, dct_scaling = true,
}

local function loader_options(opts)
  local what = 'Loader'
  opts = core.options(what, opts, LOADER_DEFAULTS)
  local o = setmetatable({}, { __index = function(_, k)
    local v = opts[k]
    if v == nil then return LOADER_DEFAULTS[k] end
    return v
  end })
  local c = ffi.new('ts_data_loader_options')
  c.batch_size = check_integer(what, 'batch_size', o.batch_size, 1)
  c.image_size = check_integer(what, 'image_size', o.image_size, 1)
  for i = 1, 2 do
    c.scale[i - 1] = list_opt(o.scale, 2, what, 'scale')[i]
    c.ratio[i - 1] = list_opt(o.ratio, 2, what, 'ratio')[i]
  end
  c.hflip = check_number(what, 'hflip', o.hflip)
  c.normalize = check_boolean(what, 'normalize', o.normalize) and 1 or 0
  for i = 1, 3 do
    c.mean[i - 1] = list_opt(o.mean, 3, what, 'mean')[i]
    c.std[i - 1] = list_opt(o.std, 3, what, 'std')[i]
  end
  c.seed = check_integer(what, 'seed', o.seed, 0)
  c.num_workers = check_integer(what, 'num_workers', o.num_workers, 0)
  c.prefetch = check_integer(what, 'prefetch', o.prefetch, 1)
  c.rank = check_integer(what, 'rank', o.rank, 0)
  c.world_size = check_integer(what, 'world_size', o.world_size, 1)
  c.drop_last = check_boolean(what, 'drop_last', o.drop_last) and 1 or 0
  c.shuffle = check_boolean(what, 'shuffle', o.shuffle) and 1 or 0
  c.dct_scaling = check_boolean(what, 'dct_scaling', o.dct_scaling) and 1 or 0
  return c
end

local loader_ct
local function loader_handle(l)
  local h = l.h
  if h == nil then error('Loader: used after close()', 0) end
  return h
end

function data.Loader(dataset, opts)
  if not data.is_dataset(dataset) then
    error('Loader: expected a dataset (T.data.ImageFolder, FileList or IDX), got ' .. type(dataset), 0)
  end
  local h = C.ts_data_loader_new(dataset.h, loader_options(opts))
  if h == nil then core.raise() end
  return loader_ct(h)
end

function Loader:num_batches() return tonumber(C.ts_data_loader_num_batches(loader_handle(self))) end
function Loader:num_samples() return tonumber(C.ts_data_loader_num_samples(loader_handle(self))) end
function Loader:skipped() return tonumber(C.ts_data_loader_skipped(loader_handle(self))) end

function Loader:options()
  local o = ffi.new('ts_data_loader_options')
  check(C.ts_data_loader_options_get(loader_handle(self), o))
  return o
end

function Loader:set_epoch(epoch)
  check(C.ts_data_loader_set_epoch(loader_handle(self), check_integer('set_epoch', 'epoch', epoch, 0)))
end

-- The next batch (images, labels, indices), or nil at the end of the epoch.
function Loader:next()
  local images, labels, indices = ffi.new('ts_tensor*[1]'), ffi.new('ts_tensor*[1]'), ffi.new('ts_tensor*[1]')
  local got = C.ts_data_loader_next(loader_handle(self), images, labels, indices)
  if got < 0 then core.raise() end
  if got == 0 then return nil end
  return wrap(images[0]), wrap(labels[0]), wrap(indices[0])
end

function Loader:state()
  local s = ffi.new('ts_data_loader_state')
  check(C.ts_data_loader_get_state(loader_handle(self), s))
  local o = self:options()
  return { epoch = tonumber(s.epoch), batch = tonumber(s.batch), seed = tonumber(s.seed),
    batch_size = tonumber(o.batch_size), rank = tonumber(o.rank), world_size = tonumber(o.world_size),
    num_samples = self:num_samples() }
end

-- Restores a state from loader:state(); the loader must shard and batch as the one that saved it.
function Loader:load_state(s)
  local what = 'load_state'
  if type(s) ~= 'table' then error(what .. ': expected a state table from loader:state()', 0) end
  local mine = self:state()
  for _, k in ipairs { 'batch_size', 'rank', 'world_size', 'num_samples' } do
    if s[k] ~= nil and s[k] ~= mine[k] then
      error(string.format('%s: the state was saved with %s = %s, this loader has %s', what, k, tostring(s[k]),
        tostring(mine[k])), 0)
    end
  end
  local c = ffi.new('ts_data_loader_state')
  c.epoch = check_integer(what, 'epoch', s.epoch, 0)
  c.batch = check_integer(what, 'batch', s.batch, 0)
  c.seed = check_integer(what, 'seed', s.seed == nil and mine.seed or s.seed, 0)
  check(C.ts_data_loader_set_state(loader_handle(self), c))
end

-- for images, labels, indices in loader:iter() do ... end. Continues the current epoch where it
-- stands (a resumed state, or batch 0 after set_epoch); an epoch already finished is replayed from
-- its start, as iterating a torch DataLoader again without set_epoch does.
function Loader:iter()
  local st = self:state()
  if st.batch >= self:num_batches() and self:num_batches() > 0 then
    self:load_state { epoch = st.epoch, batch = 0, seed = st.seed }
  end
  return function() return self:next() end
end

function Loader:close()
  local h = self.h
  if h ~= nil then
    self.h = nil
    C.ts_data_loader_close(h)
  end
end

local loader_mt = {
  __index = Loader,
  __len = function(l) return l:num_batches() end,
  __gc = function(l) if l.h ~= nil then C.ts_data_loader_close(l.h) end end,
  __tostring = function(l)
    if l.h == nil then return 'Loader(closed)' end
    local s = l:state()
    return string.format('Loader(%d batches of %d, epoch %d, next batch %d)', l:num_batches(), s.batch_size, s.epoch,
      s.batch)
  end,
}
loader_ct = ffi.metatype('tessera_data_loader', loader_mt)

function data.is_loader(x) return ffi.istype(loader_ct, x) end

T.data = data
return data
