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
local function string_arg(x, what, name)
  if type(x) ~= 'string' then
    error(string.format('%s: %s must be a string, got %s', what, name, type(x)), 0)
  end
  return x
end

local function integer_opt(v, what, name, lo)
  if not core.is_integer(v) or v < lo then
    error(string.format('%s: %s must be an integer >= %d, got %s', what, name, lo, tostring(v)), 0)
  end
  return v
end

local function number_opt(v, what, name)
  if type(v) ~= 'number' or v ~= v then
    error(string.format('%s: %s must be a number, got %s', what, name, tostring(v)), 0)
  end
  return v
end

local function boolean_opt(v, what, name)
  if type(v) ~= 'boolean' then
    error(string.format('%s: %s must be a boolean, got %s', what, name, tostring(v)), 0)
  end
  return v
end

local function list_opt(v, n, what, name)
  if type(v) ~= 'table' or #v ~= n then
    error(string.format('%s: %s must be a list of %d numbers, got %s', what, name, n, tostring(v)), 0)
  end
  for i = 1, n do number_opt(v[i], what, name .. '[' .. i .. ']') end
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
  return new_dataset(C.TS_DATA_IMAGE_FOLDER, string_arg(root, 'ImageFolder', 'root'), nil, 'ImageFolder')
end

function data.FileList(root, list_file)
  return new_dataset(C.TS_DATA_FILE_LIST, string_arg(root, 'FileList', 'root'),
    string_arg(list_file, 'FileList', 'list_file'), 'FileList')
end

function data.IDX(images_path, labels_path)
  return new_dataset(C.TS_DATA_IDX, string_arg(images_path, 'IDX', 'images_path'),
    string_arg(labels_path, 'IDX', 'labels_path'), 'IDX')
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
  return wrap(C.ts_data_decode(string_arg(path, 'decode', 'path')))
end

function data.write_jpeg(path, img, opts)
  string_arg(path, 'write_jpeg', 'path')
  opts = core.options('write_jpeg', opts, { quality = true })
  local quality = opts.quality == nil and 90 or integer_opt(opts.quality, 'write_jpeg', 'quality', 1)
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
  check(C.ts_data_crop_params(integer_opt(p.seed or 0, what, 'seed', 0), integer_opt(p.epoch or 0, what, 'epoch', 0),
    integer_opt(p.index or 0, what, 'index', 0), integer_opt(p.height, what, 'height', 1),
    integer_opt(p.width, what, 'width', 1), pair(p.scale or { 0.2, 1.0 }, what, 'scale'),
    pair(p.ratio or { 3 / 4, 4 / 3 }, what, 'ratio'), number_opt(p.hflip or 0.5, what, 'hflip'), out))
  return { top = tonumber(out.top), left = tonumber(out.left), height = tonumber(out.height),
    width = tonumber(out.width), flip = out.flip ~= 0 }
end

local function crop_struct(crop, what)
  if type(crop) ~= 'table' then error(what .. ': crop must be a table {top, left, height, width, flip}', 0) end
  local c = ffi.new('ts_data_crop')
  c.top, c.left = integer_opt(crop.top, what, 'crop.top', 0), integer_opt(crop.left, what, 'crop.left', 0)
  c.height, c.width = integer_opt(crop.height, what, 'crop.height', 1), integer_opt(crop.width, what, 'crop.width', 1)
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
  local normalize = opts.normalize == nil and true or boolean_opt(opts.normalize, what, 'normalize')
  return wrap(C.ts_data_resized_crop(handle(img, what), crop_struct(crop, what), integer_opt(h_, what, 'size', 1),
    integer_opt(w_, what, 'size', 1), normalize and 1 or 0, triple(opts.mean or IMAGENET_MEAN, what, 'mean'),
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
  c.batch_size = integer_opt(o.batch_size, what, 'batch_size', 1)
  c.image_size = integer_opt(o.image_size, what, 'image_size', 1)
  for i = 1, 2 do
    c.scale[i - 1] = list_opt(o.scale, 2, what, 'scale')[i]
    c.ratio[i - 1] = list_opt(o.ratio, 2, what, 'ratio')[i]
  end
  c.hflip = number_opt(o.hflip, what, 'hflip')
  c.normalize = boolean_opt(o.normalize, what, 'normalize') and 1 or 0
  for i = 1, 3 do
    c.mean[i - 1] = list_opt(o.mean, 3, what, 'mean')[i]
    c.std[i - 1] = list_opt(o.std, 3, what, 'std')[i]
  end
  c.seed = integer_opt(o.seed, what, 'seed', 0)
  c.num_workers = integer_opt(o.num_workers, what, 'num_workers', 0)
  c.prefetch = integer_opt(o.prefetch, what, 'prefetch', 1)
  c.rank = integer_opt(o.rank, what, 'rank', 0)
  c.world_size = integer_opt(o.world_size, what, 'world_size', 1)
  c.drop_last = boolean_opt(o.drop_last, what, 'drop_last') and 1 or 0
  c.shuffle = boolean_opt(o.shuffle, what, 'shuffle') and 1 or 0
  c.dct_scaling = boolean_opt(o.dct_scaling, what, 'dct_scaling') and 1 or 0
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
  check(C.ts_data_loader_set_epoch(loader_handle(self), integer_opt(epoch, 'set_epoch', 'epoch', 0)))
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
  c.epoch = integer_opt(s.epoch, what, 'epoch', 0)
  c.batch = integer_opt(s.batch, what, 'batch', 0)
  c.seed = integer_opt(s.seed == nil and mine.seed or s.seed, what, 'seed', 0)
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
