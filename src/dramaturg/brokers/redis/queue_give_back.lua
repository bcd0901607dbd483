-- Gives a purge's step back: the tasks queue_purge.lua took, whose records could not be
-- written, go back to the heads of their lists in the order they were taken, with their
-- bodies (a worker takes them next, as it would have), and the step is closed.
-- KEYS: as queue_purge.lua's (the sorted set of steps, the step's hash, then pairs of
-- (list, bodies hash)). ARGV: the step's name, the purge's token, then (list's index in
-- KEYS, id, body) for each task, in the order queue_purge.lua returned them.
-- Returns how many went back, or -1 when the step is no longer the purge's: another
-- process took it for left behind (queue_purge_claim.lua) and finishes it as purged, so
-- nothing goes back (a task whose record says purged is never run).
-- The closed step keeps its owner and "given" for a day, so that a retry of this call
-- (its first reply was lost) pushes nothing twice, even after a worker ran and
-- acknowledged a task given back.
if redis.call("hget", KEYS[2], "owner") ~= ARGV[2] then
    return -1
end
if redis.call("hexists", KEYS[2], "given") == 1 then
    return 0
end
local given = 0
for a = #ARGV - 2, 3, -3 do
    local i = tonumber(ARGV[a])
    if redis.call("hsetnx", KEYS[i + 1], ARGV[a + 1], ARGV[a + 2]) == 1 then
        redis.call("lpush", KEYS[i], ARGV[a + 1])
        given = given + 1
    end
end
redis.call("del", KEYS[2])
redis.call("hset", KEYS[2], "owner", ARGV[2], "given", "1")
redis.call("pexpire", KEYS[2], 86400000)
redis.call("zrem", KEYS[1], ARGV[1])
return given
