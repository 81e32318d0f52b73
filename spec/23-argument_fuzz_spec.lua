-- Every public function and method called with arguments drawn from a
-- generator (nil, booleans, integers around 0/2^31/2^53/2^63, NaN, inf,
-- empty and 1 MiB strings, "\0", tables with wrong fields, functions,
-- coroutines, userdata of other types, closed objects), a bounded count
-- per function: each call returns or raises an error whose message names
-- the function; nothing crashes or hangs, and the client works after.
local helper = require "spec.helpers.etcd"
local etcd3 = require "etcd3"

local CALLS_PER_FUNCTION = 40

describe("argument fuzz", function()
  local member, cli
  local start_member, stop_member = helper.member_and_client(function(m, c) member, cli = m, c end, nil,
    { timeout = 0.5 })
  setup(start_member)
  teardown(stop_member)

  -- a fixed seed, so a run is repeatable (ETCD3_FUZZ_SEED=… for others)
  local seed = tonumber(os.getenv("ETCD3_FUZZ_SEED") or "") or 20261201
  -- a generator of its own (an LCG), so math.random (free ports) is left
  -- alone and both runtimes draw the same sequence
  local state = seed % 2147483648
  local function random(lo, hi)
    state = (state * 1103515245 + 12345) % 2147483648
    return lo + state % (hi - lo + 1)
  end

  local closed_client = assert(etcd3.new { endpoints = "127.0.0.1:1", dial_timeout = 0 })
  closed_client:close()
  local values = {
    false, true, 0, -1, 1, 2^31 - 1, 2^31, -2^31, 2^53, 2^53 + 1, -2^53, 2^63, -2^63,
    0 / 0, math.huge, -math.huge, 0.5, "", "\0", "k", "/fuzz/", "ffffffffffffffff",
    "not an id", ("x"):rep(1024 * 1024), {}, { 1, 2, 3 }, { key = 1 }, { bogus = true },
    { prefix = "yes" }, { timeout = -1 }, { timeout = 0.01 }, { limit = 2^63 }, function() end,
    coroutine.create(function() end), io.stdout, closed_client,
  }
  local function value() return values[random(1, #values)] end
  -- nil as well: argument lists of 0 to 3, with holes
  local function arguments()
    local n = random(0, 3)
    local args = {}
    for i = 1, n do if random(1, 5) > 1 then args[i] = value() end end
    return args, n
  end

  -- Methods left out, each for a reason that is not "it might fail":
  local SKIP = {
    close = "ends the object under test (closing is fuzzed on throwaway clients below)",
    snapshot = "writes a file at whatever path it is given",
    pollfd = "returns the client's fd: nothing to fuzz",
    member_add = "adds a member that never starts: the one-member cluster loses its quorum",
    member_remove = "changes the cluster the other specs of this run use",
    member_update = "changes the cluster the other specs of this run use",
    member_promote = "changes the cluster the other specs of this run use",
    move_leader = "changes the cluster the other specs of this run use",
    auth_enable = "would lock every later call out",
    -- etcd 3.4 itself exits on a name longer than bbolt's key limit (32 KiB):
    -- a 1 MiB role or user name kills the member (a server bug, not ours)
    role_add = "a 1 MiB role name crashes etcd 3.4 (bbolt's key size limit)",
    user_add = "a 1 MiB user name crashes etcd 3.4 (bbolt's key size limit)",
  }

  -- Methods whose first argument is how long to wait: no timeout, or an
  -- infinite (or 2^63 s) one, on a quiet stream waits as asked, so those
  -- get finite ones (other types still go through, and must raise).
  local WAITS = { next = true, wait_lost = true, update = true, lock = true, wait = true,
    dequeue = true, rlock = true, enter = true, leave = true }
  local function finite(args, n)
    if args[1] == nil then args[1] = 0.01 end
    for i = 1, math.max(n, 1) do
      if type(args[i]) == "number" and args[i] > 5 then args[i] = 0.01 end
    end
    return math.max(n, 1)
  end

  local unpack = table.unpack or unpack
  -- `fname` may be a set of names (a method and its aliases, such as
  -- txn:Then for txn:success): the error names any of them.
  local function names_it(message, fname)
    if type(fname) == "string" then return message:find(fname, 1, true) end
    for alias in pairs(fname) do
      if message:find(alias, 1, true) then return true end
    end
    return false
  end
  local function fuzz(object, name, method, fname)
    local waits = WAITS[name:match("[%w_]+$")] or name:find("campaign", 1, true)
    for _ = 1, CALLS_PER_FUNCTION do
      local args, n = arguments()
      if waits then n = finite(args, n) end
      local ok, err = pcall(method, object, unpack(args, 1, n))
      if not ok then
        local message = tostring(err)
        assert(names_it(message, fname),
          ("%s(%d args) raised an error that does not name it: %s (seed %d)"):format(name, n, message:sub(1, 200), seed))
      end
    end
  end

  -- Every function field of a table (its metatable's __index too) whose
  -- name does not start with "_".
  local function methods_of(object)
    local found, seen = {}, {}
    local function scan(t)
      if type(t) ~= "table" or seen[t] then return end
      seen[t] = true
      for k, v in pairs(t) do
        if type(k) == "string" and k:sub(1, 1) ~= "_" and type(v) == "function" and not SKIP[k] then
          found[k] = v
        end
      end
      local mt = getmetatable(t)
      if mt then scan(mt.__index) end
    end
    scan(object)
    return found
  end

  local function fuzz_object(label, object, prefix)
    local count, methods, aliases = 0, methods_of(object), {}
    for name, method in pairs(methods) do
      aliases[method] = aliases[method] or {}
      aliases[method][(prefix or "") .. name] = true
    end
    -- in name order: with the fixed seed, every run makes the same calls
    local names = {}
    for name in pairs(methods) do names[#names + 1] = name end
    table.sort(names)
    for _, name in ipairs(names) do
      fuzz(object, label .. ":" .. name, methods[name], aliases[methods[name]])
      count = count + 1
    end
    return count
  end

  it("the client's methods", function()
    -- (a public name the client class lacks loads the methods etcd3 loads
    -- on first use: all of them are then there to find)
    assert.is_function(cli.session)
    local n = fuzz_object("client", cli)
    assert.is_true(n >= 35, "only " .. n .. " client methods found")
    assert(cli:put("/fuzz/after", "ok"))
    assert.are.equal("ok", assert(cli:get("/fuzz/after")).kvs[1].value)
  end)

  it("the module's functions and the txn builder", function()
    for name, f in pairs(etcd3) do
      if type(f) == "function" and name ~= "new" then fuzz(nil, "etcd3." .. name, function(_, ...) return f(...) end, name) end
    end
    fuzz(nil, "etcd3.new", function(_, ...) local c = etcd3.new(...); if type(c) == "table" then c:close() end end, "new")
    for name, f in pairs(etcd3.op) do fuzz(nil, "etcd3.op." .. name, function(_, ...) return f(...) end, name) end
    for name, f in pairs(etcd3.compare) do fuzz(nil, "etcd3.compare." .. name, function(_, ...) return f(...) end, name) end
    fuzz_object("txn", cli:txn())
    assert(cli:get("/fuzz/after"))
  end)

  it("leases, watchers, sessions, mutexes, elections, the contrib recipes, mirrors and registrations", function()
    local lease = assert(cli:grant(30))
    fuzz_object("lease", lease, "lease:")
    local watcher = assert(cli:watch("/fuzz/w"))
    fuzz_object("watcher", watcher, "watcher:")
    watcher:cancel()
    local session = assert(cli:session { ttl = 30 })
    fuzz_object("mutex", session:mutex("/fuzz/lock"))
    local election = session:election("/fuzz/elect")
    fuzz_object("election", election)
    fuzz_object("double_barrier", session:double_barrier("/fuzz/double", 2))
    fuzz_object("rwmutex", session:rwmutex("/fuzz/rw"))
    fuzz_object("session", session)
    fuzz_object("queue", cli:queue("/fuzz/q"))
    fuzz_object("priority_queue", cli:priority_queue("/fuzz/pq"))
    fuzz_object("barrier", cli:barrier("/fuzz/barrier"))
    local mirror = assert(cli:mirror("/fuzz/"))
    fuzz_object("mirror", mirror, "mirror:")
    mirror:close()
    local reg = assert(cli:register("/fuzz/reg", "v"))
    fuzz_object("registration", reg, "registration:")
    reg:close()
    session:close()
    assert(cli:put("/fuzz/after", "ok2"))
  end)

  it("closed objects raise a clear error and close is idempotent", function()
    for _ = 1, 20 do
      local c = assert(etcd3.new { endpoints = member.endpoint })
      local w = assert(c:watch("/fuzz/c"))
      local l = assert(c:grant(30))
      c:close()
      c:close()
      local ok, err = pcall(c.get, c, "/k")
      assert.is_false(ok)
      assert.matches("closed", tostring(err))
      assert.is_nil((w:next(0)))
      -- a lease outlives its client in etcd until its TTL: asking is fine
      assert.is_true(pcall(l.alive, l))
      assert.has_error(function() l:keepalive() end)
    end
    assert(cli:get("/fuzz/after"))
  end)
end)
