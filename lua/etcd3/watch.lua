--- Watchers: every watcher of a client shares one gRPC Watch stream, run
-- by the engine thread, which resumes each watcher from its last revision
-- + 1 on another endpoint when the stream breaks (no event lost, none
-- repeated). Lua only reads what arrived.
--
--   local w = assert(cli:watch("/nodes/", { prefix = true }))
--   for ev in w:events() do print(ev.type, ev.kv.key, ev.kv.value) end
--   if w.err then print("watch ended: " .. w.err) end
local core = require "etcd3.core"
local check = require "etcd3.check"
local errors = require "etcd3.error"
local kv = require "etcd3.kv"
local endpoints = require "etcd3.endpoints"
local namespace = require "etcd3.namespace"
local wait = require "etcd3.wait"

local setmetatable, ipairs, tostring = setmetatable, ipairs, tostring
local math_huge = math.huge
local now = core.now
local tointeger = math.tointeger or function(v) return v end

local _M = {}

---@class etcd3.WatchEvent
---@field type "PUT"|"DELETE"
---@field kv etcd3.KeyValue
---@field prev_kv etcd3.KeyValue? with `prev_kv = true`

---@class etcd3.WatchOptions: etcd3.RangeOptions, etcd3.TimeoutOptions
---@field start_revision? integer deliver the changes since this revision
---@field prev_kv? boolean each event carries the key as it was
---@field filters? ("noput"|"nodelete")[] leave out these events
---@field progress_notify? boolean etcd sends progress notifications on a quiet watch
---@field fragment? boolean etcd may split large revisions
---@field max_queued? integer events kept for Lua before the watch ends (100000)

--- One watch: read its events with next() or events().
---@class etcd3.Watcher
---@field client etcd3.Client
---@field key string the key (or range start) watched
---@field err etcd3.Error? why the watch ended (nil while alive and after cancel)
local Watcher = { __class = "Watcher" }
Watcher.__index = Watcher

-- Events a watcher holds for Lua before the watch ends with an error, when
-- `max_queued` is not given.
local DEFAULT_MAX_QUEUED = 100000

local FILTERS = { noput = true, nodelete = true }

local WATCH_OPTIONS = {
  prefix = "boolean", range_end = "string", from_key = "boolean",
  start_revision = "integer", prev_kv = "boolean", filters = "table",
  progress_notify = "boolean", fragment = "boolean", max_queued = "integer",
  timeout = "number",
}

local function ended_error(code, message, compact_revision)
  if code == nil then return nil end
  local fields = nil
  if code == "COMPACTED" then fields = { compact_revision = tointeger(compact_revision) } end
  return errors.new(code, message, "Watch.Watch", fields)
end

local function timeout_error()
  return errors.new("TIMEOUT", "no event within the timeout (the watch is alive)", "Watch.Watch")
end

--- The next event, waiting at most `timeout` seconds (0 polls, nil waits
-- until an event or the end). TIMEOUT when none came and the watch is
-- alive; otherwise the error that ended the watch.
---@param timeout? number
---@return etcd3.WatchEvent? event
---@return etcd3.Error? err
function Watcher:next(timeout)
  check.self("watcher:next", self, "Watcher")
  if timeout ~= nil then check.arg("watcher:next", 1, timeout, "number") end
  local deadline = now() + (timeout or math_huge)
  while true do
    local buffer, i = self._buffer, self._next_index
    local event = buffer[i]
    if event ~= nil then
      buffer[i] = nil
      self._next_index = i + 1
      return event
    end
    local events, code, message, compact_revision = self._state:poll()
    if not events then
      self.err = ended_error(code, message, compact_revision)
      return nil, self.err or errors.new("CANCELLED", "the watcher was cancelled", "Watch.Watch")
    end
    if #events > 0 then
      local prefix = self.client._namespace
      if prefix then
        for _, arrived in ipairs(events) do
          namespace.strip_kv(prefix, arrived.kv)
          namespace.strip_kv(prefix, arrived.prev_kv)
        end
      end
      self._buffer, self._next_index = events, 1
    else
      if timeout == 0 then return nil, timeout_error() end
      local ok, err = self.client._wait(self.client, self._state, deadline)
      if err then return nil, err end
      if not ok then return nil, timeout_error() end
    end
  end
end

--- `for event in watcher:events() do … end`: ends when the watch ends;
-- watcher.err then says why (nil after cancel).
---@return fun(): etcd3.WatchEvent?
function Watcher:events()
  check.self("watcher:events", self, "Watcher")
  return function()
    local event = self:next()
    return event
  end
end

--- The last revision seen (events and progress notifications).
---@return integer
function Watcher:revision()
  check.self("watcher:revision", self, "Watcher")
  return tointeger(self._state:revision())
end

--- Asks etcd for a progress notification, which moves revision() forward
-- on a quiet watch. false when nothing was sent (no watch stream is open,
-- or out of memory). etcd 3.4 may send the answer ahead of events at or
-- below its revision: they still arrive (once), after revision() moved.
---@return boolean
function Watcher:request_progress()
  check.self("watcher:request_progress", self, "Watcher")
  return self._state:progress()
end

--- Ends the watcher (events() ends, err stays nil), and cancels it on the
-- server. Idempotent; also on __close and collection.
function Watcher:cancel()
  check.self("watcher:cancel", self, "Watcher")
  self._state:cancel()
  self._buffer, self._next_index = {}, 1
end
Watcher.__close = Watcher.cancel

function Watcher:__tostring()
  return ("etcd3.Watcher %q (revision %s)"):format(self.key, tostring(self:revision()))
end

-- The client's watch method (init.lua adds it to the client class) ------------

---@class etcd3.Client
local Client = {}
_M.client_methods = Client

--- Watches a key or a range; returns once etcd has confirmed the watch, so
-- every change made after it is delivered.
---@param key string
---@param opts? etcd3.WatchOptions
---@return etcd3.Watcher? watcher
---@return etcd3.Error? err
function Client:watch(key, opts)
  check.self("watch", self, "Client")
  local range_key, range_end
  opts, range_key, range_end = kv.checked_range("watch", key, opts, WATCH_OPTIONS,
    4) -- check -> checked_range -> watch -> user
  local spec = {
    key = range_key, start_revision = opts.start_revision, prev_kv = opts.prev_kv,
    progress_notify = opts.progress_notify, fragment = opts.fragment,
    max_queued = opts.max_queued or DEFAULT_MAX_QUEUED,
    range_end = range_end,
  }
  local prefix = self._namespace
  if prefix then
    spec.key = namespace.key(prefix, spec.key, spec.range_end)
    spec.range_end = namespace.range_end(prefix, spec.range_end)
  end
  for i, filter in ipairs(opts.filters or {}) do
    if not FILTERS[filter] then
      check.fail("watch", ("option 'filters'[%d]: \"noput\" or \"nodelete\" expected, got %s"):format(i,
        tostring(filter)))
    end
    spec[filter] = true
  end
  local state = self:_handle("watch"):watch(spec)
  local created = {
    ready = function()
      local is_created, ended = state:state()
      return is_created or ended
    end,
    wait = function(_, seconds) state:wait(seconds) end,
  }
  local deadline = now() + (opts.timeout or self.timeout)
  local ok, err = wait.until_ready(self, created, deadline, "Watch.Watch")
  if not ok and err.code == "DEADLINE_EXCEEDED" then
    err.message = "etcd did not confirm the watch in time" .. endpoints.why(self, self._core:pick())
  end
  if not ok then
    state:cancel()
    return nil, err
  end
  local is_created = state:state()
  if not is_created then
    local _, code, message, compact_revision = state:poll()
    -- COMPACTED is reported by the watcher's next(), like clientv3 does
    if code ~= "COMPACTED" then
      return nil, ended_error(code or "CANCELLED", message, compact_revision)
    end
  end
  return setmetatable({ client = self, key = key, _state = state, _buffer = {}, _next_index = 1 }, Watcher)
end

return _M
