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
local namespace = require "etcd3.namespace"

local setmetatable, ipairs, math_huge = setmetatable, ipairs, math.huge
local now = core.now
local tointeger = math.tointeger or function(v) return v end

local Watcher = { __class = "Watcher" }
Watcher.__index = Watcher

local _M = { Watcher = Watcher, DEFAULT_MAX_QUEUED = 100000 }

local FILTERS = { noput = true, nodelete = true }

local WATCH_OPTS = {
  prefix = "boolean", range_end = "string", from_key = "boolean",
  start_revision = "integer", prev_kv = "boolean", filters = "table",
  progress_notify = "boolean", fragment = "boolean", max_queued = "integer",
  timeout = "number",
}

local function ended_error(code, message, compact_revision)
  if code == nil then return nil end
  local fields = nil
  if code == "COMPACTED" then fields = { compact_revision = tointeger(compact_revision) } end
  return errors.new(code, nil, message, "Watch.Watch", fields)
end

local function timeout_error()
  return errors.new("TIMEOUT", 4, "no event within the timeout (the watch is alive)", "Watch.Watch")
end

--- watcher:next([timeout]) -> event | nil, err
-- timeout: seconds (0 polls, nil waits until an event or the end).
function Watcher:next(timeout)
  check.self("watcher:next", self, "Watcher")
  if timeout ~= nil then check.arg("watcher:next", 1, timeout, "number") end
  local deadline = now() + (timeout or math_huge)
  while true do
    local buffer, i = self._buffer, self._next_index
    local ev = buffer[i]
    if ev ~= nil then
      buffer[i] = nil
      self._next_index = i + 1
      return ev
    end
    local events, code, message, compact = self._state:poll()
    if not events then
      self.err = ended_error(code, message, compact)
      return nil, self.err or errors.new("CANCELLED", 1, "the watcher was cancelled", "Watch.Watch")
    end
    if #events > 0 then
      local ns = self.client._ns
      if ns then
        for _, e in ipairs(events) do
          namespace.strip_kv(ns, e.kv)
          namespace.strip_kv(ns, e.prev_kv)
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

--- for ev in watcher:events() do … end: ends when the watch ends;
-- watcher.err then says why (nil after cancel).
function Watcher:events()
  check.self("watcher:events", self, "Watcher")
  return function()
    local ev = self:next()
    return ev
  end
end

--- watcher:revision() -> the last revision seen (events and progress)
function Watcher:revision()
  check.self("watcher:revision", self, "Watcher")
  return tointeger(self._state:revision())
end

--- watcher:request_progress() -> true: asks etcd for a progress
-- notification, which moves revision() forward on a quiet watch.
function Watcher:request_progress()
  check.self("watcher:request_progress", self, "Watcher")
  return self._state:progress()
end

--- watcher:cancel(): ends the watcher (events() ends, err stays nil), and
-- cancels it on the server. Idempotent; also on __close and collection.
function Watcher:cancel()
  check.self("watcher:cancel", self, "Watcher")
  self._state:cancel()
  self._buffer, self._next_index = {}, 1
end
Watcher.__close = Watcher.cancel

function Watcher:__tostring()
  return ("etcd3.Watcher %q (revision %s)"):format(self.key, tostring(self:revision()))
end

function _M.install(Client)
  --- client:watch(key [, opts]) -> watcher | nil, err: returns once etcd has
  -- confirmed the watch, so every change made after it is delivered.
  function Client:watch(key, opts)
    check.self("watch", self, "Client")
    check.arg("watch", 1, key, "string")
    opts = check.options("watch", opts, WATCH_OPTS)
    local given = (opts.prefix and 1 or 0) + (opts.range_end and 1 or 0) + (opts.from_key and 1 or 0)
    if given > 1 then check.fail("watch", "options 'prefix', 'range_end' and 'from_key' exclude each other") end
    local spec = {
      key = kv.range_key(key, opts), start_revision = opts.start_revision, prev_kv = opts.prev_kv,
      progress_notify = opts.progress_notify, fragment = opts.fragment,
      max_queued = opts.max_queued or _M.DEFAULT_MAX_QUEUED,
      range_end = opts.prefix and kv.prefix_end(key) or opts.from_key and "\0" or opts.range_end,
    }
    local ns = self._ns
    if ns then
      spec.key = namespace.key(ns, spec.key, spec.range_end)
      spec.range_end = namespace.range_end(ns, spec.range_end)
    end
    for i, f in ipairs(opts.filters or {}) do
      if not FILTERS[f] then
        check.fail("watch", ("option 'filters'[%d]: \"noput\" or \"nodelete\" expected, got %s"):format(i, tostring(f)))
      end
      spec[f] = true
    end
    local state = self:_handle("watch"):watch(spec)
    local created = {
      ready = function()
        local is_created, ended = state:state()
        return is_created or ended
      end,
      wait = function(_, seconds) state:wait(seconds) end,
    }
    local ok, err = self._wait(self, created, now() + (opts.timeout or self.timeout))
    if not ok then
      state:cancel()
      return nil, err or errors.new("DEADLINE_EXCEEDED", 4,
        "etcd did not confirm the watch in time" .. self:_why(self._current), "Watch.Watch")
    end
    local is_created = state:state()
    if not is_created then
      local _, code, message, compact = state:poll()
      -- COMPACTED is reported by the watcher's next(), like clientv3 does
      if code ~= "COMPACTED" then
        return nil, ended_error(code or "CANCELLED", message, compact)
      end
    end
    return setmetatable({ client = self, key = key, _state = state, _buffer = {}, _next_index = 1 }, Watcher)
  end
end

return _M
