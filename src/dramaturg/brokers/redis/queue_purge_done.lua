-- Deletes a purge step whose records and batch ends are written, if it is still the
-- caller's (compare-and-delete: of two processes finishing one step, whichever took it
-- last deletes it). Returns 1 when deleted, 0 when another process holds it or it is gone.
-- KEYS: the sorted set of steps, the step's hash. ARGV: the step's name, the caller's token.
if redis.call("hget", KEYS[2], "owner") ~= ARGV[2] then
    return 0
end
redis.call("del", KEYS[2])
redis.call("zrem", KEYS[1], ARGV[1])
return 1
