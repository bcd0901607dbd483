-- Takes held tasks for a kicker, under its token, until its lease runs out (after
-- held_functions.lua).
-- ARGV: now, when the lease runs out, token, "all" or "ids", the ids...
-- Returns id, stored entry, id, stored entry... of what was taken.
give_back_stale(ARGV[1])
local ids = {}
if ARGV[4] == "all" then
    ids = redis.call("zrange", KEYS[2], 0, -1)
else
    for i = 5, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local taken = {}
for _, id in ipairs(ids) do
    local task = redis.call("hget", KEYS[1], id)
    if task then
        redis.call("hdel", KEYS[1], id)
        redis.call("zrem", KEYS[2], id)
        redis.call("hset", KEYS[3], id, task)
        redis.call("zadd", KEYS[4], ARGV[2], id)
        redis.call("hset", KEYS[5], id, ARGV[3])
        taken[#taken + 1] = id
        taken[#taken + 1] = task
    end
end
return taken
