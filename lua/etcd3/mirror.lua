--- Mirror: a local, consistent copy of every key under a prefix.
--
--   local m = assert(cli:mirror("/config/"))
--   print(m:get("/config/a"), m:count(), m:revision())
--   for _, c in ipairs(assert(m:update(1))) do print(c.type, c.key, c.value) end
--
-- A paged snapshot read at one revision, then a watch from the next one.
-- Events wait in the watcher until update() (or sync()) applies them, so
-- the copy changes only inside those two. When the revision to resume
-- from was compacted, a new snapshot replaces the copy and the difference
-- is reported as changes.
local check = require "etcd3.check"
local errors = require "etcd3.error"

local setmetatable, pairs, ipairs, math_max = setmetatable, pairs, ipairs, math.max
local table_sort = table.sort
local now = require("etcd3.core").now

local _M = {}

local Mirror = { __class = "Mirror" }
Mirror.__index = Mirror

local MIRROR_OPTS = { page_size = "integer", timeout = "number" }

-- A snapshot read whose revision was compacted between its first request
-- and a page is read again, this many times.
local SNAPSHOT_ATTEMPTS = 3

local function open_mirror(fname, self)
  check.self(fname, self, "Mirror", 4)
  if self._closed then check.fail(fname, "the mirror is closed", 4) end
  return self
end

--- Every key of the prefix at one revision: { kvs = { [key] = kv },
-- count, revision } | nil, err.
function Mirror:_snapshot()
  local client, prefix, err = self.client, self.prefix, nil
  for _ = 1, SNAPSHOT_ATTEMPTS do
    local head
    head, err = client:get(prefix, { prefix = true, count_only = true, timeout = self._timeout })
    if not head then return nil, err end
    local revision = head.header.revision
    local kvs, count = {}, 0
    for page, perr in client:pages(prefix, { prefix = true, revision = revision,
        page_size = self._page_size, timeout = self._timeout }) do
      if not page then
        err = perr
        break
      end
      for _, kv in ipairs(page) do
        kvs[kv.key] = kv
        count = count + 1
      end
    end
    if not err then return { kvs = kvs, count = count, revision = revision } end
    -- etcd says OUT_OF_RANGE for a revision compacted meanwhile
    if err.code ~= "OUT_OF_RANGE" then return nil, err end
  end
  return nil, err
end

--- Starts the watch from the revision after the copy's.
function Mirror:_watch()
  local w, err = self.client:watch(self.prefix, { prefix = true, start_revision = self._rev + 1,
    timeout = self._timeout })
  if not w then return nil, err end
  self._w = w
  return true
end

--- Applies one watch event; appends the change it made.
function Mirror:_apply(ev, changes)
  local kv = ev.kv
  local skip = self._skip_to
  if skip then
    -- sync() found the copy equal to the store at `skip`: what the watch
    -- still delivers up to there made no difference (see sync)
    if kv.mod_revision <= skip then return end
    self._skip_to = nil
  end
  local key = kv.key
  local old = self._kvs[key]
  if ev.type == "PUT" then
    if not old then
      self._count, self._sorted = self._count + 1, nil
    end
    self._kvs[key] = kv
    changes[#changes + 1] = { type = "PUT", key = key, value = kv.value, prev_value = old and old.value, kv = kv }
  elseif old then
    self._kvs[key] = nil
    self._count, self._sorted = self._count - 1, nil
    changes[#changes + 1] = { type = "DELETE", key = key, prev_value = old.value, kv = kv }
  end
  if kv.mod_revision > self._rev then self._rev = kv.mod_revision end
end

local function by_revision(a, b)
  local ra, rb = a.kv.mod_revision, b.kv.mod_revision
  if ra ~= rb then return ra < rb end
  return a.key < b.key
end

--- After a compaction: a new snapshot replaces the copy; the difference
-- is appended to `changes` in revision order (a DELETE found this way
-- carries kv = { key, mod_revision = the snapshot's revision }).
function Mirror:_resync(changes)
  local snap, err = self:_snapshot()
  if not snap then return nil, err end
  local diff, old_kvs = {}, self._kvs
  for key, kv in pairs(snap.kvs) do
    local old = old_kvs[key]
    if not old or old.mod_revision ~= kv.mod_revision then
      diff[#diff + 1] = { type = "PUT", key = key, value = kv.value, prev_value = old and old.value, kv = kv }
    end
  end
  for key, old in pairs(old_kvs) do
    if not snap.kvs[key] then
      diff[#diff + 1] = { type = "DELETE", key = key, prev_value = old.value,
        kv = { key = key, mod_revision = snap.revision } }
    end
  end
  table_sort(diff, by_revision)
  for _, c in ipairs(diff) do changes[#changes + 1] = c end
  self._kvs, self._count, self._rev, self._sorted = snap.kvs, snap.count, snap.revision, nil
  self._skip_to = nil
  return true
end

--- Applies every change that arrived to the copy, appending them to
-- `changes`; waits up to `wait` seconds for the first one. Returns true,
-- or nil, err when it could apply nothing.
function Mirror:_pull(changes, wait)
  local deadline, before = now() + wait, #changes
  while true do
    if not self._w then
      local ok, err = self:_watch()
      if not ok then
        if #changes > before then return true end
        return nil, err
      end
    end
    local left = #changes == before and math_max(deadline - now(), 0) or 0
    local ev, err = self._w:next(left)
    if ev then
      self:_apply(ev, changes)
    elseif err.code == "TIMEOUT" then
      return true
    else
      self._w:cancel()
      self._w = nil
      if err.code == "COMPACTED" then
        local ok, serr = self:_resync(changes)
        if not ok then
          if #changes > before then return true end
          return nil, serr
        end
      else
        -- The watch ended (it is restarted from the copy's revision by
        -- the next update): report what was applied, else why.
        if #changes > before then return true end
        return nil, err
      end
    end
  end
end

--- The C state of the watch, when every event it delivered was applied
-- (for etcd3.ngx's writer, which hands it a shared dict); else nil.
function Mirror:_watch_state()
  local w = self._w
  if w and w._buffer[w._next_index] == nil then return w._state end
  return nil
end

--- m:update([timeout]) -> { change, … } | nil, err: applies every change
-- that arrived, waiting up to `timeout` seconds (default 0: poll) for the
-- first one. Each change: { type = "PUT"|"DELETE", key, value, prev_value, kv }.
-- What sync() applied since the last update comes first.
function Mirror:update(timeout)
  open_mirror("mirror:update", self)
  if timeout ~= nil then check.arg("mirror:update", 1, timeout, "number") end
  local changes = self._synced or {}
  self._synced = nil
  local ok, err = self:_pull(changes, #changes == 0 and timeout or 0)
  if not ok then return nil, err end
  return changes
end

--- m:sync([timeout]) -> revision | nil, err: brings the copy up to etcd's
-- revision at the time of the call, so that a read from the copy after it
-- sees every write that completed before it (a linearizable read, served
-- from memory). The revision comes from a linearizable read of one key;
-- the copy reaches it by applying what the watch delivered. When the
-- store moved on outside the prefix (or a change under it is still on its
-- way), one range read at that revision, sorted by modification and
-- returning a single key, tells whether the prefix changed since the
-- copy's revision: etcd 3.4 may answer a progress request ahead of events
-- already queued on the stream, so a progress response cannot prove it.
-- What it applied is reported by the next update().
function Mirror:sync(timeout)
  open_mirror("mirror:sync", self)
  if timeout ~= nil then check.arg("mirror:sync", 1, timeout, "number") end
  local client = self.client
  local deadline = now() + (timeout or self._timeout or client.timeout)
  -- (any one key will do; "" is not a key etcd takes)
  local head, err = client:get(self.prefix ~= "" and self.prefix or "\0", { count_only = true,
    timeout = deadline - now() })
  if not head then return nil, err end
  local target = head.header.revision
  local changes = self._synced or {}
  self._synced = changes
  local wait = 0 -- (first take what already arrived)
  while self._rev < target do
    local ok, perr = self:_pull(changes, wait)
    if not ok then return nil, perr end
    if self._rev >= target then break end
    local left = deadline - now()
    if left <= 0 then
      return nil, errors.new("DEADLINE_EXCEEDED", ("mirror:sync: the copy is at revision %d, etcd at %d")
        :format(self._rev, target))
    end
    local at, verr = client:get(self.prefix, { prefix = true, revision = target, keys_only = true,
      sort_target = "mod", sort_order = "descend", limit = 1, timeout = left })
    if not at then return nil, verr end
    local newest = at.kvs[1]
    if at.count == self._count and (not newest or newest.mod_revision <= self._rev) then
      -- every key there at `target` is in the copy, unchanged, and no
      -- other: the prefix did not change in between (a key made and
      -- deleted meanwhile left nothing), so the copy is the store at
      -- `target`, and those events are skipped when they arrive
      self._rev, self._skip_to = target, target
      break
    end
    wait = deadline - now() -- a change is on its way: wait for it
  end
  if #changes == 0 then self._synced = nil end
  return target
end

--- m:get(key) -> value, kv (nil when the key is not in the copy)
function Mirror:get(key)
  open_mirror("mirror:get", self)
  check.arg("mirror:get", 1, key, "string")
  local kv = self._kvs[key]
  if kv then return kv.value, kv end
  return nil
end

--- for key, value in m:pairs() do … end: in key order
function Mirror:pairs()
  open_mirror("mirror:pairs", self)
  local kvs, sorted = self._kvs, self._sorted
  if not sorted then
    sorted = {}
    for key in pairs(kvs) do sorted[#sorted + 1] = key end
    table_sort(sorted)
    self._sorted = sorted
  end
  local i = 0
  return function()
    while true do
      i = i + 1
      local key = sorted[i]
      if key == nil then return nil end
      -- (a key deleted by an update() called during the loop is skipped)
      local kv = kvs[key]
      if kv then return key, kv.value end
    end
  end
end

--- m:count() -> the number of keys in the copy
function Mirror:count()
  open_mirror("mirror:count", self)
  return self._count
end

--- m:revision() -> the revision the copy equals the store at
function Mirror:revision()
  open_mirror("mirror:revision", self)
  return self._rev
end

--- m:close(): ends the watch and drops the copy. Idempotent.
function Mirror:close()
  check.self("mirror:close", self, "Mirror")
  if self._w then self._w:cancel() end
  self._w, self._kvs, self._sorted, self._closed = nil, nil, nil, true
end
Mirror.__close = Mirror.close

function Mirror:__tostring()
  if self._closed then return ("etcd3.Mirror %q closed"):format(self.prefix) end
  return ("etcd3.Mirror %q (%d keys at revision %d)"):format(self.prefix, self._count, self._rev)
end

-- The client's methods (init.lua adds them to the client class) ----------

---@class etcd3.Client
local Client = {}
_M.client_methods = Client

--- client:mirror(prefix [, { page_size, timeout }]) -> mirror | nil, err
function Client:mirror(prefix, opts)
  check.self("mirror", self, "Client")
  check.arg("mirror", 1, prefix, "string")
  opts = check.options("mirror", opts, MIRROR_OPTS)
  if opts.page_size ~= nil and opts.page_size < 1 then check.fail("mirror", "option 'page_size' must be >= 1") end
  local m = setmetatable({ client = self, prefix = prefix, _page_size = opts.page_size,
    _timeout = opts.timeout }, Mirror)
  local snap, err = m:_snapshot()
  if not snap then return nil, err end
  m._kvs, m._count, m._rev = snap.kvs, snap.count, snap.revision
  local ok, werr = m:_watch()
  if not ok then return nil, werr end
  return m
end
_M.Mirror = Mirror

return _M
