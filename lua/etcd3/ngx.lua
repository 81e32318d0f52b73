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
local check = require "etcd3.check"
local errors = require "etcd3.error"

-- luacheck: push ignore 113 (ngx: OpenResty's global)
local ngx = ngx
-- luacheck: pop
local type, pairs, ipairs, tostring, setmetatable, pcall = type, pairs, ipairs, tostring, setmetatable, pcall
local math_min = math.min

local _M = {}

-- The dict's internal keys. They start with "\0", so a prefix that could
-- cover them is refused (see check_prefix).
local REV = "\0etcd3:rev"       -- the revision the copy equals the store at
local ERR = "\0etcd3:err"       -- why the copy is not current (absent: it is)
local BEAT = "\0etcd3:beat"     -- refreshed by the writer in step with the copy
local LOCK = "\0etcd3:lock"     -- held while a batch is written
local WRITER = "\0etcd3:writer" -- the writing process's pid (for operators)

-- The lock expires by itself after this long: a writer killed while
-- holding it does not block its successor for longer.
local LOCK_TTL = 5
-- The writer refreshes BEAT at least every UPDATE_WAIT seconds; a view
-- reports the copy stale once BEAT is older than BEAT_TTL.
local UPDATE_WAIT = 1
local BEAT_TTL = 10
-- The writer checks that etcd answers this often,
-- waiting this long for the answer.
local PROBE_EVERY, PROBE_TIMEOUT = 5, 3
-- A writer that cannot reach etcd tries again after these many seconds,
-- doubling up to the maximum.
local RETRY_MIN, RETRY_MAX = 0.5, 5

-- mirror{}'s own options; every other one it takes is an etcd3.new option
-- (client.lua's CONFIG, the one list of them), passed to etcd3.new as it is.
local OWN_OPTS = { dict = "string", prefix = "string", page_size = "integer" }

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

local function log(level, ...)
  ngx.log(level, "etcd3.ngx: ", ...)
end

--- Takes the dict's lock, waiting (without blocking the worker) while
-- another writer holds it. -> true, or false once the worker exits.
function Writer:lock()
  local dict = self.dict
  while true do
    if dict:add(LOCK, ngx.worker.pid(), LOCK_TTL) then return true end
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

--- Stores one key; a key that cannot be stored is removed (never a stale
-- value) and counted in self.missing.
function Writer:store(key, value)
  local dict = self.dict
  if value == nil then
    dict:delete(key)
    self.missing[key] = nil
    return
  end
  if dict:get(key) == value then
    self.missing[key] = nil
    return
  end
  -- safe_set never evicts another key to make room: a full dict shows as
  -- an error, not as a silently partial copy
  local ok, err = dict:safe_set(key, value)
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
  for _, key in ipairs(dict:get_keys(0)) do
    if not internal(key) and m:get(key) == nil then dict:delete(key) end
  end
  self.missing = {}
  self.missing_count = 0
  for key, value in m:pairs() do self:store(key, value) end
end

--- Sets an internal key; in a full dict it may evict a key of the copy
-- to make room: then every key of the copy is checked again.
function Writer:set_internal(key, value, ttl)
  local dict = self.dict
  if dict:safe_set(key, value, ttl) then return true end
  local ok, err, forcible = dict:set(key, value, ttl)
  if forcible then self.evicted = true end
  if not ok then log(ngx.ERR, "the dict ", self.name, " cannot even hold ", key:sub(8), ": ", tostring(err)) end
  return ok
end

--- After writing up to revision `rev`: the revision, the heartbeat and the
-- error (a full dict) for the views.
function Writer:finish(rev)
  self.evicted = false
  self:set_internal(REV, rev)
  self:set_internal(BEAT, ngx.now(), BEAT_TTL)
  self:set_internal(WRITER, ngx.worker.pid())
  self.written = rev
  local message
  for _ = 1, 2 do
    local missing = self:count_missing()
    message = missing > 0 and ("the dict %q is full: %d keys not stored (%s); make lua_shared_dict %s larger"):format(
      self.name, missing, tostring(self.missing_reason or "no memory"), self.name) or nil
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

--- Brings the dict to the mirror's revision when it is older.
-- `changes`: what the mirror applied since its last sync (nil: unknown).
function Writer:sync(changes)
  if not self:lock() then return end
  local dict, rev = self.dict, self.m:revision()
  local ok, err = pcall(function()
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
    if changes and current == self.written then
      for _, c in ipairs(changes) do self:store(c.key, c.value) end
    else
      -- a new writer, or the dict was written by another one: the whole
      -- copy (keys whose value is already right are left as they are)
      self:write_all()
    end
    self:finish(rev)
  end)
  dict:delete(LOCK)
  if not ok then error(err, 0) end
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
      self:sync(self.written and changes or nil)
    end
  end
  m:close()
  cli:close()
  return true
end

local run

--- The writer's timer: one session after another until the worker exits.
function run(premature, self)
  if premature or ngx.worker.exiting() then return end
  local ok, done, err = pcall(Writer.session, self)
  if self.m then pcall(self.m.close, self.m) end
  if self.cli then pcall(self.cli.close, self.cli) end
  self.m, self.cli = nil, nil
  if ok and done then return end
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

--- mirror{ dict, prefix, endpoints, ... } in init_worker_by_lua* of every
-- worker -> true (the calling process writes) | false (it only reads).
-- Every etcd3.new option (endpoints, namespace, auto_sync, tls, …) is passed
-- to etcd3.new, page_size to client:mirror.
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
  if not is_writer() then return false end
  local self = setmetatable({ cfg = cfg, name = cfg.dict, dict = dict, missing = {}, missing_count = 0,
    retry = RETRY_MIN }, Writer)
  local ok, err = ngx.timer.at(0, run, self)
  if not ok then error("etcd3.ngx.mirror: cannot start the writer's timer: " .. tostring(err), 2) end
  return true
end

-- The view -----------------------------------------------------------------

local View = { __class = "View" }
View.__index = View

--- view(dict) -> view: reads the copy in a lua_shared_dict (any worker).
function _M.view(name)
  check.arg("ngx.view", 1, name, "string")
  return setmetatable({ dict = shared_dict("ngx.view", name), name = name }, View)
end

--- view:get(key) -> the value string, or nil
function View:get(key)
  check.self("view:get", self, "View")
  check.arg("view:get", 1, key, "string")
  if internal(key) then return nil end
  return (self.dict:get(key))
end

--- for key, value in view:pairs() do … end: in key order, as the copy is
-- while the loop runs (a key deleted meanwhile is skipped).
function View:pairs()
  check.self("view:pairs", self, "View")
  local dict = self.dict
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
      local value = dict:get(key)
      if value ~= nil then return key, value end
    end
  end
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

-- view:wait polls the dict's revision: nginx has no cross-process wake-up
-- a shared dict could carry, and a dict read costs well under a microsecond.
local WAIT_STEP_MIN, WAIT_STEP_MAX = 0.001, 0.008

--- view:wait(revision [, timeout]) -> the copy's revision once it is newer
-- than `revision` | nil, err (err.code "TIMEOUT"). Polls the dict with
-- ngx.sleep, 1 ms then growing to 8 ms between polls; in init_worker it
-- blocks the worker instead (it serves nothing yet).
function View:wait(revision, timeout)
  check.self("view:wait", self, "View")
  check.arg("view:wait", 1, revision, "number")
  if timeout ~= nil then check.arg("view:wait", 2, timeout, "number") end
  local dict = self.dict
  local rev = dict:get(REV) or 0
  if rev > revision then return rev end
  local perr = require("etcd3.wait").precheck()
  if perr then return nil, perr end
  local phase = ngx.get_phase()
  local sleep = (phase == "init_worker" or phase == "init") and require("etcd3.core").sleep or ngx.sleep
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
    sleep(math_min(step, left))
    if step < WAIT_STEP_MAX then step = step * 2 end
    rev = dict:get(REV) or 0
    if rev > revision then return rev end
  end
end

function View:__tostring()
  return ("etcd3.ngx view %q (revision %d)"):format(self.name, self:revision())
end

return _M
