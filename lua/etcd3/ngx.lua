--- A prefix mirrored into a lua_shared_dict for every worker of an nginx,
-- with one etcd watch per nginx instance (README.md, "Shared dict mirror").
--
--   init_worker_by_lua_block {
--     require("etcd3.ngx").mirror { dict = "etcd_cfg", prefix = "/app/",
--                                   endpoints = "127.0.0.1:2379" }
--   }
--   content_by_lua_block {
--     ngx.say(require("etcd3.ngx").view("etcd_cfg"):get("/app/upstream"))
--   }
--
-- One process writes: the privileged agent when it was enabled through
-- this module's enable_privileged_agent(), else worker 0. It runs
-- client:mirror(prefix) in a timer and copies every change into the dict;
-- the other workers only read the dict.
--
-- Several writers may be alive at once (an old worker 0 during a reload, a
-- killed worker 0 and its replacement), so every write carries the
-- revision it brings the copy to: the dict keeps the copy's revision, and a
-- writer applies a batch only when it is newer than the dict's copy, under
-- a lock in the dict (held without yielding, so only for the time the
-- batch takes). A writer whose copy is not the one in the dict (a new
-- writer, or another writer wrote meanwhile) rewrites the whole copy,
-- deleting the keys it does not have, so the copy is exact.
--
-- Each key of the copy carries its mod revision in the dict's flags (modulo
-- 2^32), so a view decodes a value once per revision. Next to the copy the
-- writer keeps a change log (the "\0etcd3:log" keys below), written in the
-- same locked batch: a ring of `log_size` entries, slot = sequence number
-- modulo the ring's size, each entry naming its own sequence number so a
-- reader that raced the writer sees the entry is not the one it wanted.
local check = require "etcd3.check"
local errors = require "etcd3.error"

-- luacheck: push ignore 113 (ngx: OpenResty's global)
local ngx = ngx
-- luacheck: pop
local type, pairs, ipairs, tostring, tonumber, setmetatable, pcall = type, pairs, ipairs, tostring, tonumber,
  setmetatable, pcall
local math_min, math_max, math_floor = math.min, math.max, math.floor

local _M = {}

-- The dict's internal keys. They start with "\0", so a prefix that could
-- cover them is refused (see check_prefix).
local REV = "\0etcd3:rev"       -- the revision the copy equals the store at
local ERR = "\0etcd3:err"       -- why the copy is not current (absent: it is)
local BEAT = "\0etcd3:beat"     -- refreshed by the writer in step with the copy
local LOCK = "\0etcd3:lock"     -- held while a batch is written
local WRITER = "\0etcd3:writer" -- the writing process's pid (for operators)
local COUNT = "\0etcd3:count"   -- the number of keys in the copy (bounds a view's decode cache)
local FEED = "\0etcd3:feed"     -- the path of the writer's wake-up socket (view:wait)
-- The change log's state, one value so a reader gets all of it at once:
-- "head tail from size". Entries head-1 down to tail are kept; they hold
-- every change after revision `from`; entry seq lives in slot seq % size.
local LOG = "\0etcd3:log"
-- .. slot: one change, "seq type revision key" (type "P" or "D")
local ENTRY = "\0etcd3:log:"
-- The dict's flags hold a key's mod revision modulo this (they are 32 bits).
local FLAGS_MOD = 2 ^ 32

-- The lock expires by itself after this long: a writer killed while
-- holding it does not block its successor for longer.
local LOCK_TTL = 5
-- The writer wakes at least every UPDATE_WAIT seconds, and refreshes BEAT
-- at least every IDLE_BEAT + UPDATE_WAIT; a view reports the copy stale
-- once BEAT is older than BEAT_TTL.
local UPDATE_WAIT = 1
local BEAT_TTL = 10
-- A batch rewrites the internal keys that did not change (BEAT, WRITER,
-- FEED, ERR; something else may have removed them) at most this often.
local REFRESH_EVERY = 1
-- With nothing changing while the engine thread holds the dict (hand_over),
-- the writer takes it back for the heartbeat only this often (a reader in
-- an exiting worker ends at the latest then).
local IDLE_BEAT = 3
-- The writer checks that etcd answers this often,
-- waiting this long for the answer.
local PROBE_EVERY, PROBE_TIMEOUT = 5, 3
-- A writer that cannot reach etcd tries again after these many seconds,
-- doubling up to the maximum.
local RETRY_MIN, RETRY_MAX = 0.5, 5

-- mirror{}'s own options; every other one it takes is an etcd3.new option
-- (client.lua's CONFIG, the one list of them), passed to etcd3.new as it is.
local OWN_OPTS = { dict = "string", prefix = "string", page_size = "integer", log_size = "integer" }
local DEFAULT_LOG_SIZE = 10000

-- OWN_OPTS and etcd3.new's options, made on first use (so requiring this
-- module in init_by_lua* loads no more than before).
local mirror_opts, client_opts

local function options()
  if not mirror_opts then
    client_opts = require("etcd3.client").CONFIG
    local all = {}
    for name, kind in pairs(client_opts) do all[name] = kind end
    for name, kind in pairs(OWN_OPTS) do
      if all[name] ~= nil then error("etcd3.ngx: option '" .. name .. "' is both etcd3.new's and the mirror's", 0) end
      all[name] = kind
    end
    mirror_opts = all
  end
  return mirror_opts
end

local function internal(key)
  return key:byte(1) == 0 and key:sub(1, 7) == "\0etcd3:"
end

local function check_prefix(fname, prefix)
  if prefix == "" or ("\0etcd3:"):sub(1, #prefix) == prefix then
    check.fail(fname, "option 'prefix' must not cover the keys starting with \"\\0etcd3:\" "
      .. "that the dict keeps for itself (an empty prefix does)", 4)
  end
end

local function shared_dict(fname, name)
  if not (ngx and ngx.shared) then check.fail(fname, "needs OpenResty (nginx with lua-nginx-module)", 4) end
  local dict = ngx.shared[name]
  if not dict then
    check.fail(fname, ("no lua_shared_dict named %q in nginx.conf"):format(name), 4)
  end
  return dict
end

-- The writer ----------------------------------------------------------------

-- Whether enable_privileged_agent() succeeded in this nginx's init phase
-- (inherited by every process forked from the master).
local agent_enabled = false

--- In init_by_lua*: enables nginx's privileged agent (OpenResty's nginx;
-- needs its core patch) and makes it the writer instead of worker 0.
-- -> true | nil, message (as ngx.process.enable_privileged_agent).
function _M.enable_privileged_agent(connections)
  local ok, err = require("ngx.process").enable_privileged_agent(connections)
  if ok then agent_enabled = true end
  return ok, err
end

local Writer = {}
Writer.__index = Writer

-- The writers in this process: dict name -> writer.
local writers = {}

-- What wakes this worker's views of each dict: dict name -> { path, sema,
-- started, waited, connected, ended, idle, here }. A light thread reads
-- the writer's feed; when the writer runs in this very process and writes
-- every batch itself (here), it wakes them itself, with no connection.
local feeds = {}

--- Wakes every view waiting on the feed: they look at the dict again.
local function wake(st)
  local waiting = -st.sema:count()
  if waiting > 0 then st.sema:post(waiting) end
end

local function log(level, ...)
  ngx.log(level, "etcd3.ngx: ", ...)
end

--- Takes the dict's lock, waiting (without blocking the worker) while
-- another writer holds it. -> true, or false once the worker exits.
function Writer:lock()
  local dict, pid = self.dict, self.pid
  while true do
    -- in a full dict the lock may evict a key of the copy: counted as
    -- set_internal's evictions are
    local ok, _, forcible = dict:add(LOCK, pid, LOCK_TTL)
    if forcible then self.evicted, self.evicted_log = true, true end
    if ok then return true end
    if ngx.worker.exiting() then return false end
    ngx.sleep(0.001)
  end
end

function Writer:set_error(message)
  if message == nil then
    self.dict:delete(ERR)
  elseif self.dict:get(ERR) ~= message then
    self:set_internal(ERR, message)
  end
end

--- Stores one key at its mod revision `rev`; a key that cannot be stored
-- is removed (never a stale value) and counted in self.missing.
function Writer:store(key, value, rev)
  local dict = self.dict
  if value == nil then
    dict:delete(key)
    self.missing[key] = nil
    return
  end
  local flags = rev % FLAGS_MOD
  local old, old_flags = dict:get(key)
  if old == value and (old_flags or 0) == flags then
    self.missing[key] = nil
    return
  end
  -- safe_set never evicts another key to make room: a full dict shows as
  -- an error, not as a silently partial copy
  local ok, err = dict:safe_set(key, value, 0, flags)
  -- the copy comes first: the oldest changes of the log make room
  while not ok and self:shrink_log() do ok, err = dict:safe_set(key, value, 0, flags) end
  if ok then
    self.missing[key] = nil
  else
    dict:delete(key)
    if not self.missing[key] then
      self.missing[key] = true
      self.missing_count = self.missing_count + 1
      self.missing_reason = err
    end
  end
end

function Writer:count_missing()
  local n = 0
  for _ in pairs(self.missing) do n = n + 1 end
  self.missing_count = n
  return n
end

--- The whole copy: every key of the mirror, and no other key.
function Writer:write_all()
  local dict, m = self.dict, self.m
  self.refreshed = nil -- (the internal keys too, at the end of the batch)
  for _, key in ipairs(dict:get_keys(0)) do
    if not internal(key) and m:get(key) == nil then dict:delete(key) end
  end
  self.missing = {}
  self.missing_count = 0
  for key, value in m:pairs() do
    local _, kv = m:get(key)
    self:store(key, value, kv.mod_revision)
  end
end

-- The change log ------------------------------------------------------------

local function parse_log(text)
  if not text then return nil end
  local head, tail, from, size = text:match("^(%d+) (%d+) (%d+) (%d+)$")
  return tonumber(head), tonumber(tail), tonumber(from), tonumber(size)
end

--- One entry's text -> seq, "P"|"D", revision, key (nil when absent).
local function parse_entry(text)
  if not text then return nil end
  local seq, kind, rev, key = text:match("^(%d+) ([PD]) (%d+) (.*)$")
  return tonumber(seq), kind, tonumber(rev), key
end

--- Reads the log's state from the dict (another writer may have written
-- it) -> whether it is there and kept at this writer's size.
function Writer:load_log()
  local text = self.dict:get(LOG)
  -- (most batches find the text this writer left: its state is known)
  if text == nil or text ~= self.log_text then
    local head, tail, from, size = parse_log(text)
    self.head, self.tail, self.from = head or 0, tail or head or 0, from or 0
    self.log_text, self.log_ok = nil, head ~= nil and size == self.log_size
  end
  return self.log_ok
end

--- The log starts afresh after revision `rev`: a reader further back gets
-- RESET. The old entries are removed, so their space goes to the copy.
function Writer:reset_log(rev)
  local dict = self.dict
  local head, _, _, size = parse_log(dict:get(LOG))
  if head then
    for seq = math_max(head - size, 0), head - 1 do dict:delete(ENTRY .. seq % size) end
  end
  self.head, self.tail, self.from = head or 0, head or 0, rev
  self.log_short = false
end

--- Drops the oldest eighth of the log (at least one entry) to make room
-- in a full dict; the log then starts after the last dropped revision.
-- -> false when the log was empty.
function Writer:shrink_log()
  local dict, size = self.dict, self.log_size
  local n = self.head - self.tail
  if n <= 0 then return false end
  local last = self.tail + math_max(math_floor(n / 8), 1) - 1
  local _, _, rev = parse_entry(dict:get(ENTRY .. last % size))
  for seq = self.tail, last do dict:delete(ENTRY .. seq % size) end
  -- (an entry gone already: no revision it could start after is known
  -- but the mirror's own)
  self.tail, self.from = last + 1, math_max(self.from, rev or self.m:revision())
  self.log_short = true
  return true
end

--- Appends one change (of mirror:update()) to the log. When the ring is
-- full the oldest entry makes room, and the log then starts after its
-- revision; in a full dict, older entries make room (shrink_log), and an
-- entry that fits in no way empties the log up to it.
function Writer:append(change)
  local dict, seq, size = self.dict, self.head, self.log_size
  local rev = change.kv.mod_revision
  local slot = ENTRY .. seq % size
  if seq - self.tail >= size then
    local _, _, oldest = parse_entry(dict:get(slot))
    self.tail = seq - size + 1
    self.from = math_max(self.from, oldest or rev)
  end
  local entry = ("%d %s %d %s"):format(seq, change.type == "PUT" and "P" or "D", rev, change.key)
  local ok = dict:safe_set(slot, entry)
  while not ok and self:shrink_log() do ok = dict:safe_set(slot, entry) end
  self.head = seq + 1
  if not ok then
    dict:delete(slot)
    self.tail, self.from = seq + 1, math_max(self.from, rev)
    self.log_short = true
  elseif self.head - self.tail >= size then
    self.log_short = false
  end
end

function Writer:write_log()
  local text = ("%d %d %d %d"):format(self.head, self.tail, self.from, self.log_size)
  local ok = self:set_internal(LOG, text)
  self.log_text, self.log_ok = ok and text or nil, true
end

--- Sets an internal key; in a full dict it may evict a key of the copy
-- to make room: then every key of the copy is checked again.
function Writer:set_internal(key, value, ttl)
  local dict = self.dict
  if dict:safe_set(key, value, ttl) then return true end
  -- in a batch (the log's state loaded), the oldest changes make room first
  while self.in_batch and self:shrink_log() do
    self.log_dirty = true
    if dict:safe_set(key, value, ttl) then return true end
  end
  local ok, err, forcible = dict:set(key, value, ttl)
  if forcible then self.evicted, self.evicted_log = true, true end
  if not ok then log(ngx.ERR, "the dict ", self.name, " cannot even hold ", key:sub(8), ": ", tostring(err)) end
  return ok
end

--- Whether the heartbeat is `period` seconds old or more at `now` (or
-- was never made, or the clock went back).
function Writer:beat_due(now, period)
  local refreshed = self.refreshed
  return not refreshed or now < refreshed or now - refreshed >= period
end

--- After writing up to revision `rev`: the revision, the heartbeat and the
-- error (a full dict) for the views.
function Writer:finish(rev)
  self:set_internal(REV, rev)
  local count, now = self.m:count(), ngx.now()
  -- the keys that did not change: at most every REFRESH_EVERY seconds (the
  -- heartbeat: a batch that wrote nothing, every UPDATE_WAIT, every
  -- IDLE_BEAT while idle), and at once
  -- when another writer (an old worker in a reload) wrote them meanwhile
  local refresh = self:beat_due(now, REFRESH_EVERY) or self.dict:get(WRITER) ~= self.pid
  if refresh or count ~= self.count_set then
    self:set_internal(COUNT, count)
    self.count_set = count
  end
  if refresh then
    self:set_internal(BEAT, now, BEAT_TTL)
    self:set_internal(WRITER, self.pid)
    if self.feed_path then self:set_internal(FEED, self.feed_path) end
    self.refreshed = now
  end
  self.written = rev
  local message
  for _ = 1, 2 do
    local missing = self:count_missing()
    message = missing > 0 and ("the dict %q is full: %d keys not stored (%s); make lua_shared_dict %s larger"):format(
      self.name, missing, tostring(self.missing_reason or "no memory"), self.name)
      or self.log_short and ("the dict %q is full: the change log holds fewer than the last %d changes; "
        .. "make lua_shared_dict %s larger"):format(self.name, self.log_size, self.name) or nil
    self:set_error(message or self.unreachable)
    if not self.evicted then break end
    -- an internal key took the place of a key of the copy: count again
    self.evicted = false
    for key, value in self.m:pairs() do
      if self.dict:get(key) ~= value and not self.missing[key] then
        self.missing[key] = true
        self.missing_reason = "no memory"
      end
    end
  end
  if message and self.reported ~= message then
    log(ngx.ERR, message)
  elseif not message and self.reported then
    log(ngx.NOTICE, "the dict ", self.name, " holds the whole copy again")
  end
  self.reported = message
end

--- sync's work, with the lock held.
function Writer:batch(changes)
  local dict, rev = self.dict, self.m:revision()
  local current = dict:get(REV)
  if current and current > rev then
    -- a newer writer's copy: leave it, and rewrite everything once this
    -- mirror has caught up (the writer may have stopped meanwhile)
    self.written = nil
    return
  end
  if current == rev and self.written == rev then
    -- nothing new: the heartbeat, and the error cleared once etcd answers again
    self:finish(rev)
    return
  end
  -- the log (its state written before REV: a reader that sees this
  -- batch's revision sees its entries) and the copy, in one batch
  self.in_batch, self.log_dirty = true, false
  if changes and current == self.written and self:load_log() then
    for _, c in ipairs(changes) do
      self:store(c.key, c.value, c.kv.mod_revision)
      self:append(c)
    end
  else
    -- a new writer, or the dict was written by another one: the whole
    -- copy (keys whose value is already right are left as they are),
    -- and a log that starts at it
    -- (the old log's entries first: their room goes to the copy)
    self:reset_log(rev)
    self:write_all()
  end
  self:write_log()
  self:finish(rev)
  -- an internal key evicted something: maybe log entries
  if self.evicted_log then
    self.evicted_log = false
    self:reset_log(rev)
    self.log_dirty = true
  end
  -- the log shrank to make room for an internal key: its state again
  while self.log_dirty do
    self.log_dirty = false
    self:write_log()
  end
end

--- Takes the dict back from the engine thread (src/sink.c), which wrote
-- the batches that arrived since hand_over() while it could: the writer
-- goes on from where it left the dict. -> the changes it did not write
-- (nil: unknown, the dict is written whole again).
function Writer:take_back(changes)
  local state = self.sunk
  if not state then return changes end
  self.sunk = nil
  local rev, head, tail, from, count = state:unsink()
  if rev == false then
    -- it failed after moving the log's state
    self.written = nil
    return nil
  end
  if not rev or rev == self.written then return changes end
  -- (a batch that finds nothing new does not read the log's state: it is
  -- taken here; load_log reads the same from the dict)
  self.written, self.count_set = rev, count
  self.head, self.tail, self.from, self.log_text = head, tail, from, nil
  -- what it wrote after the mirror's last update still waits in the watch
  if changes and self.m:revision() < rev then
    local more = self.m:update(0)
    for _, c in ipairs(more or {}) do changes[#changes + 1] = c end
  end
  if not changes then return nil end
  local kept, n = {}, 0
  for _, c in ipairs(changes) do
    if c.kv.mod_revision > rev then
      n = n + 1
      kept[n] = c
    end
  end
  return kept
end

--- Hands the dict to the engine thread when this writer left it whole and
-- current: from then on the engine thread writes each batch itself, as
-- batch() would, and wakes the views, without waking this one; anything
-- but that steady state it leaves to this writer (src/sink.c).
function Writer:hand_over()
  if not self.zone or self.sunk or not self.written or self.missing_count > 0 or self.log_short
    or self.evicted or self.reported or self.unreachable or not self.log_ok or self.m:revision() ~= self.written
    or self.dict:get(REV) ~= self.written then
    return
  end
  local state = self.m:_watch_state()
  if not state then return end
  local conf = self.sink_conf
  conf.rev, conf.head, conf.tail, conf.from = self.written, self.head, self.tail, self.from
  conf.count, conf.ns = self.count_set, self.cli._namespace
  if state:sink(self.zone, self.feed or nil, conf) then self.sunk = state end
end

--- Whether an update that brought `changes` can leave the dict with the
-- engine thread: nothing changed, it holds the dict (it gives a batch it
-- cannot write back to the watch, so it would not be empty), etcd answers,
-- and the last heartbeat is recent.
function Writer:idle_sunk(changes)
  return #changes == 0 and self.sunk and not self.unreachable and not self:beat_due(ngx.now(), IDLE_BEAT)
end

--- Brings the dict to the mirror's revision when it is older.
-- `changes`: what the mirror applied since its last sync (nil: unknown).
function Writer:sync(changes)
  changes = self:take_back(changes)
  if not self:lock() then return end
  -- (a method, not a closure: a closure made at each batch keeps LuaJIT
  -- from compiling the batch)
  local ok, err = pcall(self.batch, self, changes)
  self.in_batch = false
  self.dict:delete(LOCK)
  if not ok then error(err, 0) end
  -- the views waiting for a newer copy: woken once it is in the dict (a
  -- newer writer's copy counts too: they look at the dict's revision);
  -- also at each heartbeat, when a reader in an exiting worker ends
  if self.feed then self.feed:post() end
  local st = feeds[self.name]
  if st and st.here then wake(st) end
  self:hand_over()
end

--- A watch does not end when etcd becomes unreachable (the client resumes
-- it once a member answers): a read of one key, now and then, tells
-- whether the copy can still be current.
function Writer:probe()
  local ok, err = self.cli:get(self.cfg.prefix, { keys_only = true, timeout = PROBE_TIMEOUT })
  if ok then
    if self.unreachable then log(ngx.NOTICE, "etcd answers again") end
    self.unreachable = nil
  else
    local message = "the copy may be stale: etcd is unreachable: " .. tostring(err)
    if not self.unreachable then log(ngx.WARN, message) end
    self.unreachable = message
    self:set_error(message)
  end
end

--- One connection to etcd: mirror, write, follow until the worker exits or
-- the mirror fails. -> nil, err on failure.
function Writer:session()
  local etcd3 = require "etcd3"
  local cfg = self.cfg
  local conf = {}
  for name in pairs(client_opts) do conf[name] = cfg[name] end
  local cli, err = etcd3.new(conf)
  if not cli then return nil, err end
  self.cli = cli
  local m
  m, err = cli:mirror(cfg.prefix, { page_size = cfg.page_size })
  if not m then
    cli:close()
    return nil, err
  end
  self.m, self.written = m, nil
  self.retry = RETRY_MIN
  self:sync(nil)
  local probed = ngx.now()
  while not ngx.worker.exiting() do
    ngx.update_time()
    if ngx.now() - probed >= PROBE_EVERY then
      probed = ngx.now()
      self:probe()
    end
    local changes
    changes, err = m:update(UPDATE_WAIT)
    if not changes then
      -- the watch ended (etcd unreachable...): the next update restarts it
      self:set_error("the copy may be stale: " .. tostring(err))
      log(ngx.WARN, "watching ", cfg.prefix, ": ", tostring(err))
      ngx.sleep(self.retry)
      self.retry = math_min(self.retry * 2, RETRY_MAX)
    else
      self.retry = RETRY_MIN
      -- changes arrived: etcd answers
      if #changes > 0 then self.unreachable = nil end
      if not self:idle_sunk(changes) then self:sync(self.written and changes or nil) end
    end
  end
  m:close()
  cli:close()
  return true
end

--- Stops waking the views (they poll the dict until a writer's feed
-- answers again) and removes the socket.
function Writer:close_feed()
  if self.feed then self.feed:close() end
  self.feed, self.feed_path = nil, nil
  local st = feeds[self.name]
  if st and st.here then
    st.ended = true
    wake(st)
  end
end

local run

--- The writer's timer: one session after another until the worker exits.
function run(premature, self)
  if premature or ngx.worker.exiting() then return self:close_feed() end
  local ok, done, err = pcall(Writer.session, self)
  if self.m then pcall(self.m.close, self.m) end
  if self.cli then pcall(self.cli.close, self.cli) end
  self.m, self.cli = nil, nil
  self.sunk = nil -- (the watch went with the mirror)
  if ok and done then return self:close_feed() end
  local why = ok and tostring(err) or ("error: " .. tostring(done))
  log(ngx.ERR, "mirroring ", self.cfg.prefix, " into ", self.name, ": ", why)
  self:set_error("the copy may be stale: " .. why)
  local delay = self.retry
  self.retry = math_min(self.retry * 2, RETRY_MAX)
  local tok, terr = ngx.timer.at(delay, run, self)
  if not tok and not ngx.worker.exiting() then log(ngx.ERR, "cannot restart the writer: ", terr) end
end

--- Which process writes: the privileged agent when one was enabled through
-- this module, else worker 0.
local function is_writer()
  -- (ngx.process comes with lua-resty-core, which lua-nginx-module >= 0.10.16 requires)
  local ok, process = pcall(require, "ngx.process")
  if ok and process.type() == "privileged agent" then return true end
  return not agent_enabled and ngx.worker.id() == 0
end

-- The dicts this process's mirror{} calls write into: dict name -> prefix.
local mirrored = {}

--- mirror{ dict, prefix, endpoints, ... } in init_worker_by_lua* of every
-- worker -> true (the calling process writes) | false (it only reads).
-- Every etcd3.new option (endpoints, namespace, auto_sync, tls, …) is passed
-- to etcd3.new, page_size to client:mirror; log_size is the change log's.
function _M.mirror(cfg)
  check.arg("ngx.mirror", 1, cfg, "table")
  cfg = check.options("ngx.mirror", cfg, options())
  if type(cfg.dict) ~= "string" then check.fail("ngx.mirror", "option 'dict' (a lua_shared_dict's name) is required") end
  if type(cfg.prefix) ~= "string" then check.fail("ngx.mirror", "option 'prefix' is required") end
  check_prefix("ngx.mirror", cfg.prefix)
  local dict = shared_dict("ngx.mirror", cfg.dict)
  if ngx.get_phase() ~= "init_worker" then
    check.fail("ngx.mirror", "call it in init_worker_by_lua* (it runs in every worker; one of them writes)")
  end
  if cfg.log_size ~= nil and cfg.log_size < 1 then check.fail("ngx.mirror", "option 'log_size' must be >= 1") end
  -- two writers of one dict would each delete the other's keys
  if mirrored[cfg.dict] then
    check.fail("ngx.mirror", ("the dict %q already mirrors %q: give each prefix a lua_shared_dict of its own"):format(
      cfg.dict, mirrored[cfg.dict]))
  end
  mirrored[cfg.dict] = cfg.prefix
  if not is_writer() then return false end
  local self = setmetatable({ cfg = cfg, name = cfg.dict, dict = dict, missing = {}, missing_count = 0,
    retry = RETRY_MIN, log_size = cfg.log_size or DEFAULT_LOG_SIZE, pid = ngx.worker.pid() }, Writer)
  -- the engine thread writes the steady state's batches itself (see
  -- hand_over) through lua-nginx-module's shared dict functions, which serve
  -- http's dicts only: the stream module's are another module's
  local zone = dict[1]
  if type(zone) == "userdata" and ngx.config.subsystem == "http" and require("etcd3.core").sink_available() then
    self.zone = zone
    self.sink_conf = { size = self.log_size, pid = self.pid, lock_ttl = LOCK_TTL, rev_key = REV,
      lock_key = LOCK, log_key = LOG, count_key = COUNT, writer_key = WRITER, entry_prefix = ENTRY }
  end
  -- the views' wake-up (without it they poll the dict)
  local feed, ferr = require("etcd3.core").feed()
  if feed then
    self.feed, self.feed_path = feed, feed:path()
  else
    log(ngx.WARN, "views of ", cfg.dict, " will poll: ", tostring(ferr))
  end
  writers[cfg.dict] = self
  local ok, err = ngx.timer.at(0, run, self)
  if not ok then error("etcd3.ngx.mirror: cannot start the writer's timer: " .. tostring(err), 2) end
  return true
end

-- The view -----------------------------------------------------------------

local View = { __class = "View" }
View.__index = View

local VIEW_OPTS = { decode = "function" }

-- The views with a decode function, one per function and dict, so each
-- worker decodes a value once however often view() is called: decode
-- function -> { [dict name] = view }. Kept for the worker's life (a view
-- holds its function, so weak keys would not free it under LuaJIT, which
-- has no ephemerons): the README says to define the function once.
local decoding_views = {}

--- view(dict [, { decode = fn }]) -> view: reads the copy in a
-- lua_shared_dict (any worker). With decode, get and pairs give fn(value),
-- decoded once per worker per key revision.
function _M.view(name, opts)
  check.arg("ngx.view", 1, name, "string")
  opts = check.options("ngx.view", opts, VIEW_OPTS)
  local dict, decode = shared_dict("ngx.view", name), opts.decode
  if not decode then return setmetatable({ dict = dict, name = name }, View) end
  local views = decoding_views[decode]
  if not views then
    views = {}
    decoding_views[decode] = views
  end
  local view = views[name]
  if not view then
    -- cache: key -> { flags = the dict's flags (mod revision), value = decoded, err = why not }
    view = setmetatable({ dict = dict, name = name, decode = decode, cache = {}, cached = 0 }, View)
    views[name] = view
  end
  return view
end

--- Drops the cache entries of keys the copy no longer has.
function View:sweep()
  local dict, cache, n = self.dict, self.cache, 0
  for key in pairs(cache) do
    if dict:get(key) == nil then cache[key] = nil else n = n + 1 end
  end
  self.cached = n
end

function View:forget(key)
  if self.cache[key] then
    self.cache[key] = nil
    self.cached = self.cached - 1
  end
end

--- The decoded value of `key`, the dict holding `value` with `flags` for
-- it -> decoded | nil, err. Decodes only when the key's revision changed.
function View:decoded(key, value, flags)
  if value == nil then
    self:forget(key)
    return nil
  end
  local entry = self.cache[key]
  if entry and entry.flags == flags then return entry.value, entry.err end
  local ok, decoded, why = pcall(self.decode, value)
  local err
  if not ok or decoded == nil then
    why = ok and (why ~= nil and tostring(why) or "decode gave nil") or "decode raised: " .. tostring(decoded)
    decoded = nil
    err = errors.new("INVALID_ARGUMENT", ("the value of %q (revision %d in the dict's flags) cannot be decoded: %s")
      :format(key, flags or 0, why), "view:get")
    -- once per worker and revision: the entry keeps the error
    log(ngx.ERR, "dict ", self.name, ": ", err.message)
  end
  if not entry then
    -- a new key: never more entries than the copy has keys
    if self.cached >= (self.dict:get(COUNT) or 0) then self:sweep() end
    entry = {}
    self.cache[key] = entry
    self.cached = self.cached + 1
  end
  entry.flags, entry.value, entry.err = flags, decoded, err
  return decoded, err
end

--- view:get(key) -> the value string, or nil; with decode: the decoded
-- value | nil (no such key) | nil, err (decode rejected the value)
function View:get(key)
  check.self("view:get", self, "View")
  check.arg("view:get", 1, key, "string")
  if internal(key) then return nil end
  local value, flags = self.dict:get(key)
  if self.decode then return self:decoded(key, value, flags) end
  return value
end

--- for key, value in view:pairs() do … end: in key order, as the copy is
-- while the loop runs (a key deleted meanwhile is skipped). With decode:
-- key, decoded value; for a value decode rejects: key, nil, err.
function View:pairs()
  check.self("view:pairs", self, "View")
  local dict = self.dict
  -- keys deleted since they were decoded leave the cache
  if self.decode and self.cached > (dict:get(COUNT) or 0) then self:sweep() end
  local keys = {}
  for _, key in ipairs(dict:get_keys(0)) do
    if not internal(key) then keys[#keys + 1] = key end
  end
  table.sort(keys)
  local i = 0
  return function()
    while true do
      i = i + 1
      local key = keys[i]
      if key == nil then return nil end
      local value, flags = dict:get(key)
      if value ~= nil then
        if self.decode then return key, self:decoded(key, value, flags) end
        return key, value
      end
      if self.decode then self:forget(key) end
    end
  end
end

-- A reader that raced the writer (an entry replaced while it read) reads
-- the log again, this many times, before it answers RESET.
local CHANGES_ATTEMPTS = 4

local function reset(message)
  return errors.new("RESET", message .. "; read the copy again with pairs() from view:revision()", "view:changes")
end

--- view:changes(revision) -> list, rev | nil, err: the changes the copy
-- went through after `revision` up to `rev` (its revision when read; go on
-- from it), in revision order, each { type = "PUT"|"DELETE", key, revision }.
-- err.code "RESET" when the log does not reach back to `revision`.
function View:changes(revision)
  check.self("view:changes", self, "View")
  check.arg("view:changes", 1, revision, "integer")
  local dict = self.dict
  for _ = 1, CHANGES_ATTEMPTS do
    -- REV first: the writer writes a batch's log state before its REV, so
    -- the log read next holds at least every change up to rev
    local rev = dict:get(REV) or 0
    if revision >= rev then return {}, rev end
    local head, tail, from, size = parse_log(dict:get(LOG))
    if not head then return nil, reset("the dict holds no change log") end
    if revision < from then
      return nil, reset(("the change log starts after revision %d, not %d"):format(from, revision))
    end
    local list, n, torn = {}, 0, false
    -- newest first, down to the first change the caller has
    for seq = head - 1, tail, -1 do
      local eseq, kind, erev, key = parse_entry(dict:get(ENTRY .. seq % size))
      if eseq ~= seq then
        torn = true
        break
      end
      if erev <= revision then break end
      if erev <= rev then
        n = n + 1
        list[n] = { type = kind == "P" and "PUT" or "DELETE", key = key, revision = erev }
      end
    end
    if not torn then
      for i = 1, math_floor(n / 2) do list[i], list[n + 1 - i] = list[n + 1 - i], list[i] end
      if self.decode then
        for i = 1, n do
          if list[i].type == "DELETE" then self:forget(list[i].key) end
        end
      end
      return list, rev
    end
  end
  return nil, reset("the change log was rewritten while it was read")
end

--- view:revision() -> the revision the copy equals the store at (0 before
-- the first copy arrived)
function View:revision()
  check.self("view:revision", self, "View")
  return self.dict:get(REV) or 0
end

--- view:err() -> nil while the copy is current, else a message saying why not.
function View:err()
  check.self("view:err", self, "View")
  local dict = self.dict
  local err = dict:get(ERR)
  if err then return err end
  if not dict:get(REV) then
    if dict.free_space and dict:free_space() == 0 then
      return ("the dict %q is full: it cannot hold even the copy's revision"):format(self.name)
    end
    return "the copy is not loaded yet"
  end
  if not dict:get(BEAT) then
    return ("the copy may be stale: no writer refreshed it for %d s"):format(BEAT_TTL)
  end
  return nil
end

-- Without the writer's feed (init_worker, where nothing may yield, or no
-- writer listening) view:wait polls the dict's revision, this often.
local WAIT_STEP_MIN, WAIT_STEP_MAX = 0.001, 0.008
-- A worker whose reader of a feed ended connects again after this long.
local FEED_RETRY = 1
-- A worker's reader of a feed whose views stopped waiting (a gateway that
-- reads changes() at request time once loaded) leaves after this long, so
-- the worker no longer wakes for each batch; the next wait connects again.
local FEED_IDLE = 5
-- (a cosocket's longest timeout: the reader waits for the writer's bytes)
local READ_FOREVER = 2147483647

local function read_feed(sock, st)
  if not sock:connect("unix:" .. st.path) then return end
  st.connected = true
  sock:settimeout(READ_FOREVER)
  -- a batch posted before this connection was queued: look at the dict again
  wake(st)
  while not ngx.worker.exiting() do
    local _, err = sock:receiveany(64)
    if err and err ~= "timeout" then break end
    if st.sema:count() >= 0 and ngx.now() - st.waited >= FEED_IDLE then
      st.idle = true
      break
    end
    wake(st)
  end
end

--- The light thread that reads a writer's feed (src/feed.c) in this
-- worker: one byte after each batch and at each heartbeat. Ends when the
-- writer closes it (it stopped, or went) or the worker exits.
local function feed_reader(premature, st)
  if not premature then
    local sock = ngx.socket.tcp()
    -- (whatever happens, it ends: the next wait starts another)
    local ok, err = pcall(read_feed, sock, st)
    if not ok then log(ngx.ERR, "the reader of ", st.path, " failed: ", tostring(err)) end
    sock:close()
  end
  st.ended = true
  wake(st)
end

--- This worker's reader of the dict's feed, started when there is none
-- (or the writer changed); nil when views must poll.
local function feed_of(view)
  -- the writer of this process wakes its views itself, whatever FEED says
  -- (in a reload, an old writer of another process may have written it);
  -- but the engine thread, when it writes batches (Writer:hand_over), wakes
  -- them through the feed, as in any other worker
  local writer = writers[view.name]
  local own = writer and writer.feed_path
  local here = own and not writer.zone
  local path = own or view.dict:get(FEED)
  if not path then return nil end
  local old = feeds[view.name]
  local st = old
  ngx.update_time()
  -- (a reader not connected a second after its start never ran: a timer
  -- nginx dropped when too many ran at once)
  if not st or st.path ~= path or st.idle
    or (st.ended or not st.here and not st.connected) and ngx.now() - st.started >= FEED_RETRY then
    local ok, semaphore = pcall(require, "ngx.semaphore")
    if not ok then return nil end
    st = { path = path, sema = semaphore.new(0), started = ngx.now(), waited = ngx.now(),
      here = here and true or nil }
    feeds[view.name] = st
    -- views parked on the one replaced go on with this one
    if old then wake(old) end
    if not here and not ngx.timer.at(0, feed_reader, st) then st.ended = true end
  end
  if st.ended then return nil end
  return st
end

--- The error of a wait in a worker that exits.
local function exiting()
  return errors.new("CANCELLED", "the nginx worker is exiting (reload or shutdown): the wait was ended",
    "view:wait")
end

--- view:wait(revision [, timeout]) -> the copy's revision once it is newer
-- than `revision` | nil, err (err.code "TIMEOUT"; "CANCELLED" in a worker
-- that exits, at once). Parks on the worker's reader of the writer's feed,
-- woken once a batch is in the dict; without one it polls the dict, and
-- in init_worker it blocks the worker instead (it serves nothing yet).
function View:wait(revision, timeout)
  check.self("view:wait", self, "View")
  check.arg("view:wait", 1, revision, "number")
  if timeout ~= nil then check.arg("view:wait", 2, timeout, "number") end
  local dict = self.dict
  local rev = dict:get(REV) or 0
  if rev > revision then return rev end
  local perr = require("etcd3.wait").precheck()
  if perr then return nil, perr end
  if ngx.worker.exiting() then return nil, exiting() end
  local phase = ngx.get_phase()
  local blocking = phase == "init_worker" or phase == "init"
  local sleep = blocking and require("etcd3.core").sleep or ngx.sleep
  ngx.update_time()
  local deadline = ngx.now() + (timeout or 5)
  local step = WAIT_STEP_MIN
  while true do
    ngx.update_time()
    local left = deadline - ngx.now()
    if left <= 0 then
      return nil, errors.new("TIMEOUT", ("the copy did not pass revision %d in time (it is at %d)"):format(
        revision, rev), "view:wait")
    end
    local st = not blocking and feed_of(self)
    if st then
      st.waited = ngx.now()
      st.sema:wait(left) -- until the writer's next byte (or the deadline)
      if ngx.worker.exiting() then return nil, exiting() end
    else
      sleep(math_min(step, left))
      if step < WAIT_STEP_MAX then step = step * 2 end
    end
    rev = dict:get(REV) or 0
    if rev > revision then return rev end
  end
end

function View:__tostring()
  return ("etcd3.ngx view %q (revision %d)"):format(self.name, self:revision())
end

return _M
