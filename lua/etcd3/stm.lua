--- Software transactional memory (clientv3's concurrency.NewSTM): a Lua
-- function reads and writes keys through an `stm` object; its writes are
-- buffered and committed in one txn guarded by what it read, and the
-- function runs again from scratch when that guard fails.
--
--   local total = assert(cli:stm(function(stm)
--     local a = tonumber(stm:get("/acct/a") or "0")
--     stm:put("/acct/a", tostring(a - 10))
--     return a
--   end))
--
-- The four isolation levels build the same txns as Go's stm.go, so Lua and
-- Go STMs over the same keys serialise correctly:
-- - serializable_snapshot: reads at the revision of the run's first read;
--   the commit holds if every key read kept its mod revision and no key
--   written was modified after the first read (a blind write conflicts too);
-- - serializable: reads as above; the commit holds if every key read kept
--   its mod revision;
-- - repeatable_reads: serializable gets (any member), each key read once;
--   the commit holds if every key read kept its mod revision;
-- - read_committed: reads as repeatable_reads; no compares: the writes
--   always apply (a read-modify-write may lose updates).
--
-- With the two serializable levels a failed commit reads every key read
-- back in its `failure` branch, and the next run starts from those values
-- (Go's prefetch of the Else ops), which saves a round trip per conflict.
--
-- The reads and the commit are TxnRequest tables built here and sent as
-- they are, not through the txn builder: every key, value and option was
-- checked when stm:get, stm:put or stm:delete took it, and the builder's
-- objects and checks were a quarter of an uncontended commit's
-- instructions (bench/README.md, "STM hot key").
local core = require "etcd3.core"
local check = require "etcd3.check"
local errors = require "etcd3.error"

local setmetatable, select, pcall, error = setmetatable, select, pcall, error
local ipairs, pairs, next, getmetatable = ipairs, pairs, next, getmetatable
local math_min = math.min
local unpack = table.unpack or unpack -- luacheck: ignore 143 (unpack: Lua 5.1's global)
local now = core.now

local _M = {}

--- How each level reads and what its commit guards (see the table above).
local LEVELS = {
  serializable_snapshot = { snapshot = true, guard_reads = true, guard_writes = true },
  serializable = { snapshot = true, guard_reads = true },
  repeatable_reads = { guard_reads = true },
  read_committed = {},
}

local STM_OPTIONS = {
  isolation = {
    serializable_snapshot = "serializable_snapshot", serializable = "serializable",
    repeatable_reads = "repeatable_reads", read_committed = "read_committed",
  },
  prefetch = "strings", timeout = "number",
}
local PUT_OPTIONS = { lease = "id" }

--- One run's state: `_reads` key -> { kv = kv|false, revision = the
-- read's store revision }; `_writes` key -> { value = string|false, op =
-- the RequestOp }; `_order` the written keys in the order of their first
-- write (the commit sends its ops in that order); `_prefetched` what the
-- last failed commit read back (serializable levels); `_serializable` and
-- `_revision` how every read asks (the non-snapshot levels read with
-- serializable gets, as Go's do; the snapshot levels at the revision of
-- their first read, once they made it).
local STM = { __class = "STM" }
STM.__index = STM

-- A failed read aborts the run: it is raised through `fn` as this wrapper
-- and client:stm returns it as `nil, err` (Go's stmError panic). It is
-- also kept in `self._failed`, so a `pcall` inside `fn` that swallows it
-- cannot let a run with a missing read commit.
local Abort = {}

local function abort(self, err)
  self._failed = err
  error(setmetatable({ err = err }, Abort), 0)
end

local function deadline_error()
  return errors.new("DEADLINE_EXCEEDED", "the STM did not commit within its timeout", "stm")
end

--- The seconds a request made now may take: the client's timeout, cut to
-- what is left of the STM's deadline.
local function request_timeout(self)
  return math_min(self.client.timeout, self._deadline - now())
end

--- Reads the keys not yet in the read set in one txn, first taking those
-- the last failed commit read back. The run's first read fixes the
-- snapshot revision of the serializable levels.
local function fetch(self, keys)
  local reads, prefetched = self._reads, self._prefetched
  local first = next(reads) == nil
  local missing = {}
  for _, key in ipairs(keys) do
    if not reads[key] then
      if prefetched[key] then
        reads[key], prefetched[key] = prefetched[key], nil
      else
        missing[#missing + 1] = key
      end
    end
  end
  if #missing > 0 then
    local ops = {}
    local serializable, revision = self._serializable, self._revision
    for i, key in ipairs(missing) do
      ops[i] = { request_range = { key = key, serializable = serializable, revision = revision } }
    end
    local timeout = request_timeout(self)
    if timeout <= 0 then abort(self, deadline_error()) end
    local res, err = self.client:_request("stm", "KV.Txn", { success = ops }, timeout, true)
    if not res then abort(self, err) end
    local responses = res.responses
    for i, key in ipairs(missing) do
      reads[key] = { kv = responses[i].response_range.kvs[1] or false, revision = res.header.revision }
    end
  end
  local read = reads[keys[1]]
  if first and self._level.snapshot then self._serializable, self._revision = true, read.revision end
  return read
end

--- stm:get(key) -> value | nil (absent, or deleted earlier in this run)
function STM:get(key)
  check.self("stm:get", self, "STM")
  check.arg("stm:get", 1, key, "string")
  local write = self._writes[key]
  if write then return write.value or nil end
  local kv = fetch(self, { key }).kv
  return kv and kv.value or nil
end

--- stm:rev(key) -> the key's mod revision as this run reads it (0 when
-- absent); a write of this run does not change it.
function STM:rev(key)
  check.self("stm:rev", self, "STM")
  check.arg("stm:rev", 1, key, "string")
  local kv = fetch(self, { key }).kv
  return kv and kv.mod_revision or 0
end

local function buffer(self, key, value, request_op)
  if not self._writes[key] then self._order[#self._order + 1] = key end
  self._writes[key] = { value = value, op = request_op }
end

--- stm:put(key, value [, { lease = id }]): buffered until the commit.
function STM:put(key, value, opts)
  check.self("stm:put", self, "STM")
  check.arg("stm:put", 1, key, "string")
  check.arg("stm:put", 2, value, "string")
  opts = check.options("stm:put", opts, PUT_OPTIONS)
  buffer(self, key, value, { request_put = { key = key, value = value, lease = opts.lease } })
end

--- stm:delete(key): buffered until the commit.
function STM:delete(key)
  check.self("stm:delete", self, "STM")
  check.arg("stm:delete", 1, key, "string")
  buffer(self, key, false, { request_delete_range = { key = key } })
end

function STM:__tostring()
  return ("etcd3.STM (%s)"):format(self.isolation)
end


--- Starts a run from scratch (what the last failed commit read back stays).
function STM:_reset()
  self._reads, self._writes, self._order, self._failed = {}, {}, {}, nil
  self._serializable, self._revision = not self._level.snapshot or nil, nil
end

--- The commit's TxnRequest for this run (Go's conflicts() and puts(), plus
-- for the serializable levels a read of every key read in the failure
-- branch); also the keys those reads are of.
function STM:_commit_request()
  local level, reads, order, writes = self._level, self._reads, self._order, self._writes
  local compare, success, failure, read_keys = {}, {}, {}, {}
  if level.guard_reads then
    local first = nil
    for key, read in pairs(reads) do
      read_keys[#read_keys + 1] = key
      compare[#compare + 1] = { result = "EQUAL", target = "MOD", key = key,
        mod_revision = read.kv and read.kv.mod_revision or 0 }
      if not first or read.revision < first then first = read.revision end
    end
    -- not modified after the first read (without reads nothing to guard)
    if level.guard_writes and first then
      for _, key in ipairs(order) do
        compare[#compare + 1] = { result = "LESS", target = "MOD", key = key, mod_revision = first + 1 }
      end
    end
  end
  for i, key in ipairs(order) do success[i] = writes[key].op end
  if level.snapshot then
    for i, key in ipairs(read_keys) do failure[i] = { request_range = { key = key } } end
  end
  return { compare = compare, success = success, failure = failure }, read_keys
end

--- Commits the run's writes: true (committed), false (a conflict), or
-- nil, err.
function STM:_commit()
  local req, read_keys = self:_commit_request()
  local timeout = request_timeout(self)
  if timeout <= 0 then return nil, deadline_error() end
  -- without writes it only reads: it may be retried on another endpoint
  local res, err = self.client:_request("stm", "KV.Txn", req, timeout, #req.success == 0)
  if not res then return nil, err end
  if res.succeeded then return true end
  if self._level.snapshot then
    local prefetched, responses = {}, res.responses
    for i, key in ipairs(read_keys) do
      prefetched[key] = { kv = responses[i].response_range.kvs[1] or false, revision = res.header.revision }
    end
    self._prefetched = prefetched
  end
  return false
end

local function pack(...) return { n = select("#", ...), ... } end

--- One run of `fn` from scratch (under pcall: a failed read raises Abort).
local function run(self, fn)
  self:_reset()
  if self._prefetch then fetch(self, self._prefetch) end
  return fn(self)
end

-- The client's method (init.lua adds it to the client class) ---------------

---@class etcd3.Client
local Client = {}
_M.client_methods = Client

--- client:stm(fn [, { isolation, prefetch, timeout }]) -> what fn returned
-- on the run that committed (true when it returned nothing) | nil, err.
-- An error raised in fn propagates and nothing is written.
function Client:stm(fn, opts)
  check.self("stm", self, "Client")
  check.arg("stm", 1, fn, "function")
  opts = check.options("stm", opts, STM_OPTIONS)
  local isolation = opts.isolation or "serializable_snapshot"
  local prefetch = opts.prefetch
  if prefetch and #prefetch == 0 then prefetch = nil end
  local self_stm = setmetatable({
    client = self, isolation = isolation, _level = LEVELS[isolation], _prefetch = prefetch,
    _prefetched = {}, _deadline = now() + (opts.timeout or self.timeout),
  }, STM)
  while true do
    local results = pack(pcall(run, self_stm, fn))
    if not results[1] then
      local raised = results[2]
      if getmetatable(raised) == Abort then return nil, raised.err end
      error(raised, 0) -- fn's own error: nothing was written
    end
    if self_stm._failed then return nil, self_stm._failed end
    local committed, err = self_stm:_commit()
    if committed == nil then return nil, err end
    if committed then
      if results.n == 1 then return true end
      return unpack(results, 2, results.n)
    end
    if now() >= self_stm._deadline then return nil, deadline_error() end
  end
end
_M.STM = STM

return _M
