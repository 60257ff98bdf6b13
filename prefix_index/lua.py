"""The Lua scripts `RedisPrefixIndex` runs, one round trip each, atomically on the server.

Redis layout, all keys under the hash tag `{namespace}` so a Redis Cluster keeps them in one
slot (the scripts touch keys they cannot declare up front):
  {ns}:workers      set of worker ids that are registered or may still have entries
  {ns}:w:<id>       registration: JSON info, with a PX expiry (the TTL)
  {ns}:wb:<id>      set of hashes worker <id> holds (to drop them on unregister/expiry)
  {ns}:b:<hash>     set of worker ids holding block <hash>
Hashes are decimal strings of the unsigned 64-bit value: Lua numbers are doubles and would
round them. Needs Redis >= 6.2 (SMISMEMBER).
"""

# Shared Lua helper: drop up to `budget` of worker w's entries; returns how many it dropped.
_DROP = """
local function drop(prefix, w, budget)
  local hashes = redis.call('SPOP', prefix .. 'wb:' .. w, budget)
  for _, h in ipairs(hashes) do
    redis.call('SREM', prefix .. 'b:' .. h, w)
  end
  return #hashes
end
"""

# KEYS: workers set, registration key. ARGV: worker id, ttl ms, info JSON or '' (unknown here:
# only extend, so a heartbeat from another process does not clobber the info).
# Returns 1 if the registration existed before this call.
REGISTER = """
local existed = redis.call('EXISTS', KEYS[2])
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
elseif existed == 1 then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
else
  redis.call('SET', KEYS[2], '{}', 'PX', ARGV[2])
end
redis.call('SADD', KEYS[1], ARGV[1])
return existed
"""

# KEYS: workers set, registration key, worker's hash set. ARGV: prefix, worker id, #stored,
# ttl ms, info JSON or '', then the stored hashes followed by the removed ones.
# Returns 1 if the worker was registered (its view is intact).
APPLY = """
local prefix, w, ns = ARGV[1], ARGV[2], tonumber(ARGV[3])
redis.call('SADD', KEYS[1], w)
for i = 6, 5 + ns do
  redis.call('SADD', prefix .. 'b:' .. ARGV[i], w)
  redis.call('SADD', KEYS[3], ARGV[i])
end
for i = 6 + ns, #ARGV do
  redis.call('SREM', prefix .. 'b:' .. ARGV[i], w)
  redis.call('SREM', KEYS[3], ARGV[i])
end
local existed = redis.call('EXISTS', KEYS[2])
if existed == 0 and ARGV[5] ~= '' then
  -- Redis lost the registration (restart): rewrite it so these entries are not swept.
  redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[4])
end
return existed
"""

# KEYS: workers set. ARGV: prefix, then the chain's hashes. Returns a flat
# [worker, count, worker, count, ...] for every registered worker. Walks the chain once,
# asking each block's holder set about all still-matching workers at once (SMISMEMBER), and
# stops as soon as no worker matches any more.
LONGEST_PREFIX = """
local prefix = ARGV[1]
local active, out = {}, {}
for _, w in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', prefix .. 'w:' .. w) == 1 then
    active[#active + 1] = w
  end
end
local n = #ARGV - 1
local depth = 0
while #active > 0 and depth < n do
  local flags = redis.call('SMISMEMBER', prefix .. 'b:' .. ARGV[depth + 2], unpack(active))
  local still = {}
  for i, w in ipairs(active) do
    if flags[i] == 1 then
      still[#still + 1] = w
    else
      out[#out + 1] = w
      out[#out + 1] = depth
    end
  end
  active = still
  depth = depth + 1
end
for _, w in ipairs(active) do
  out[#out + 1] = w
  out[#out + 1] = depth
end
return out
"""

# KEYS: workers set. ARGV: prefix. Returns flat [worker, info JSON, ...] of registered workers.
LIVE = """
local out = {}
for _, w in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local info = redis.call('GET', ARGV[1] .. 'w:' .. w)
  if info then
    out[#out + 1] = w
    out[#out + 1] = info
  end
end
return out
"""

# KEYS: workers set. ARGV: prefix, worker id, budget. Drops up to budget of the worker's
# entries (registered or not: unregister and resync use it); once none are left and the
# worker is unregistered, forgets its id. Returns how many entries are left.
DROP_WORKER = _DROP + """
local prefix, w = ARGV[1], ARGV[2]
drop(prefix, w, tonumber(ARGV[3]))
local left = redis.call('SCARD', prefix .. 'wb:' .. w)
if left == 0 and redis.call('EXISTS', prefix .. 'w:' .. w) == 0 then
  redis.call('SREM', KEYS[1], w)
end
return left
"""

# KEYS: workers set. ARGV: prefix, budget. The lazy cleanup: drops up to budget entries of
# workers whose registration expired, forgetting a worker once it has none left.
# Returns how many entries it dropped.
SWEEP = _DROP + """
local prefix, budget = ARGV[1], tonumber(ARGV[2])
local dropped = 0
for _, w in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if dropped >= budget then break end
  if redis.call('EXISTS', prefix .. 'w:' .. w) == 0 then
    dropped = dropped + drop(prefix, w, budget - dropped)
    if redis.call('SCARD', prefix .. 'wb:' .. w) == 0 then
      redis.call('SREM', KEYS[1], w)
    end
  end
end
return dropped
"""
