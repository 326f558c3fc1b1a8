-- tessera.visualize — the pictures a pre-training run ends with: the loss curve, and the
-- reconstruction grid of the UM-MAE paper's Fig. 8 (original | masked input | reconstruction
-- with the visible patches pasted back).
local T = require 'tessera.core'.T
local Canvas = require 'tessera.canvas'
local L = require 'tessera.models.layers'
local data = require 'tessera.data'

local V = {}

local IMAGENET_MEAN, IMAGENET_STD = data.IMAGENET_MEAN, data.IMAGENET_STD
local COLOURS = { { 31, 119, 180 }, { 255, 127, 14 }, { 44, 160, 44 }, { 214, 39, 40 } }

local function fmt(v)
  if v == 0 then return '0' end
  local a = math.abs(v)
  if a >= 1e4 or a < 1e-2 then return string.format('%.1e', v) end
  return (string.format('%.3f', v):gsub('0+$', ''):gsub('%.$', ''))
end

-- A line chart of one or more series {name =, x = {...}, y = {...}} written as a PNG.
-- opts: title, xlabel, width (800), height (480).
function V.loss_curve(path, series, opts)
  opts = opts or {}
  if type(series) ~= 'table' or #series == 0 then error('loss_curve: expected a list of series', 2) end
  local W, H = opts.width or 800, opts.height or 480
  local left, right, top, bottom = 70, 20, 40, 50
  local xmin, xmax, ymin, ymax = math.huge, -math.huge, math.huge, -math.huge
  for _, s in ipairs(series) do
    if #s.x ~= #s.y then error('loss_curve: series ' .. tostring(s.name) .. ' has x and y of different lengths', 2) end
    for i = 1, #s.x do
      local y = s.y[i]
      if y == y and y ~= math.huge and y ~= -math.huge then
        xmin, xmax = math.min(xmin, s.x[i]), math.max(xmax, s.x[i])
        ymin, ymax = math.min(ymin, y), math.max(ymax, y)
      end
    end
  end
  if xmin > xmax then error('loss_curve: no finite points to draw', 2) end
  if xmax == xmin then xmax = xmin + 1 end
  if ymax == ymin then ymax, ymin = ymax + 0.5, ymin - 0.5 end
  local pad = (ymax - ymin) * 0.05
  ymin, ymax = ymin - pad, ymax + pad
  local pw, ph = W - left - right, H - top - bottom
  local function px(x) return left + (x - xmin) / (xmax - xmin) * pw end
  local function py(y) return top + (ymax - y) / (ymax - ymin) * ph end

  local c = Canvas.new(W, H)
  local grey, black = { 225, 225, 225 }, { 0, 0, 0 }
  for k = 0, 4 do -- grid lines and tick labels
    local y = ymin + (ymax - ymin) * k / 4
    c:line(left, py(y), left + pw, py(y), grey)
    local label = fmt(y)
    c:text(label, left - 8 - Canvas.text_width(label, 1), math.floor(py(y)) - 3)
    local x = xmin + (xmax - xmin) * k / 4
    c:line(px(x), top, px(x), top + ph, grey)
    label = fmt(math.floor(x + 0.5))
    c:text(label, math.floor(px(x) - Canvas.text_width(label, 1) / 2), top + ph + 8)
  end
  c:line(left, top, left, top + ph, black)
  c:line(left, top + ph, left + pw, top + ph, black)
  for k, s in ipairs(series) do
    local colour = s.colour or COLOURS[(k - 1) % #COLOURS + 1]
    local prev
    for i = 1, #s.x do
      local y = s.y[i]
      if y == y and y ~= math.huge and y ~= -math.huge then
        local p = { px(s.x[i]), py(y) }
        if prev then c:line(prev[1], prev[2], p[1], p[2], colour, 2) else c:rect(p[1] - 1, p[2] - 1, 3, 3, colour) end
        prev = p
      end
    end
    if s.name then -- legend
      c:rect(left + pw - 150, top + 8 + (k - 1) * 14, 12, 3, colour)
      c:text(s.name, left + pw - 132, top + 6 + (k - 1) * 14)
    end
  end
  if opts.title then c:text(opts.title, left, 14, 2) end
  if opts.xlabel then c:text(opts.xlabel, left + math.floor(pw / 2) - 20, H - 18) end
  return c:save(path)
end

-- Predictions for the removed patches [N, R, p*p*C] (raster order of the removed patches, as the
-- UM-MAE/MAE losses see them) placed into a full [N, L, p*p*C] patch table over `base`.
local function paste_removed(base, mask, removed_pred)
  local order, visible = L.visible_first(mask)
  local idx = order:narrow(1, visible, mask:size(1) - visible)
  return base:scatter(1, idx:unsqueeze(-1):expand(removed_pred.shape), removed_pred)
end

-- Writes the reconstruction grid: one row per image, columns original | masked | reconstruction.
-- imgs: [N, 3, H, W] as fed to the model (ImageNet-normalized unless opts.normalized = false);
-- mask: [N, L] (1 = removed); removed_pred: [N, R, p*p*3]; opts.patch: p; opts.norm_pix: the
-- predictions are per-patch normalized (they are mapped back with the original patch's mean and
-- std, as MAE's visualization does); opts.rows: at most this many images (8).
function V.reconstruction_grid(path, imgs, mask, removed_pred, opts)
  opts = opts or {}
  local p = opts.patch or error('reconstruction_grid: opts.patch (patch size in pixels) is required', 2)
  return T.no_grad(function()
    local n = math.min(imgs:size(0), opts.rows or 8)
    imgs, mask = imgs:narrow(0, 0, n):float():cpu(), mask:narrow(0, 0, n):cpu()
    removed_pred = removed_pred:narrow(0, 0, n):float():cpu()
    local C = imgs:size(1)
    local target = L.patchify(imgs, p)
    local pred = removed_pred
    if opts.norm_pix then
      local order, visible = L.visible_first(mask)
      local rows = L.take_rows(target, order:narrow(1, visible, mask:size(1) - visible))
      pred = pred * (rows:var{ dim = -1, keepdim = true } + 1e-6):sqrt() + rows:mean(-1, true)
    end
    local recon = L.unpatchify(paste_removed(target, mask, pred), p, C)
    local masked = L.unpatchify(paste_removed(target, mask, T.zeros_like(pred)), p, C)
    local function pixels(x)
      if opts.normalized == false then return x:clamp(0, 1) end
      local mean, std = T.tensor(IMAGENET_MEAN):view(1, 3, 1, 1), T.tensor(IMAGENET_STD):view(1, 3, 1, 1)
      if C == 1 then mean, std = mean:narrow(1, 0, 1), std:narrow(1, 0, 1) end
      return (x * std + mean):clamp(0, 1)
    end
    local cols = { pixels(imgs), pixels(masked), pixels(recon) }
    local h, w, gap = imgs:size(2), imgs:size(3), 2
    local scale = math.max(1, math.floor(96 / h))
    local canvas = Canvas.new(3 * w * scale + 2 * gap, n * h * scale + (n - 1) * gap + 12)
    for c = 1, 3 do canvas:text(({ 'original', 'masked', 'recon' })[c], (c - 1) * (w * scale + gap), 2, 1, w * scale, 'center') end
    for i = 0, n - 1 do
      for c = 1, 3 do
        local img = cols[c][i]
        if C == 1 then img = img:expand(3, h, w) end
        if scale > 1 then img = T.F.interpolate(img:unsqueeze(0), { size = { h * scale, w * scale }, mode = 'nearest' })[0] end
        canvas:blit(img, (c - 1) * (w * scale + gap), 12 + i * (h * scale + gap))
      end
    end
    return canvas:save(path)
  end)
end

return V
