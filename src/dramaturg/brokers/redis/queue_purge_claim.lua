-- Takes over the oldest purge step taken at or before ARGV[2] (ms): one its purge left
-- behind (killed between queue_purge.lua and the tasks' records). The step becomes the
-- caller's (owner = ARGV[4]) and its score moves to now (ARGV[3]), so no other process
-- takes it until it is as old again (the caller died finishing it too).
-- Returns {} when there is none, else {name, {field, value, ...}} (the step's hash).
-- KEYS: the sorted set of steps. ARGV: the prefix of the steps' keys, the cutoff (ms),
-- now (ms), the caller's token.
local names = redis.call("zrangebyscore", KEYS[1], "-inf", ARGV[2], "LIMIT", 0, 10)
for _, name in ipairs(names) do
    local key = ARGV[1] .. name
    if redis.call("hexists", key, "given") == 0 and redis.call("exists", key) == 1 then
        redis.call("hset", key, "owner", ARGV[4])
        redis.call("zadd", KEYS[1], ARGV[3], name)
        return {name, redis.call("hgetall", key)}
    end
    redis.call("zrem", KEYS[1], name)
end
return {}
