//+------------------------------------------------------------------+
//| TradecopyLoop.mq4 - fast command pickup for MetaTrader 4         |
//|                                                                  |
//| MT4 has no services. An EA runs only on ticks and timer events   |
//| (10-16 ms granularity on Windows); a *script* runs once, in its  |
//| own thread, for as long as it likes. This script loops           |
//|   while(!IsStopped()) { zmq_poll(1 ms); scan the trade pool; ... }|
//| so a command is read the moment it arrives (zmq_poll wakes on the|
//| frame; the 1 ms only bounds idling) and a master trade is noticed|
//| within about a millisecond instead of a timer period.            |
//|                                                                  |
//| The trade-off                                                    |
//|  + latency: ~1 ms instead of 10-16 ms, for commands and events.  |
//|  - CPU: the loop scans the trade pool ~1000 times a second (a few|
//|    percent of one core with a hundred orders; raise InpPollMs to |
//|    trade latency for CPU).                                       |
//|  - lifetime: a script is not restored when the terminal restarts |
//|    (unless started from a startup .ini, see README.md) and is    |
//|    stopped when its chart closes or another script is dropped on |
//|    that chart.                                                   |
//|  - one trade operation at a time per terminal (MT4 trade context)|
//|    holds for the script exactly as for EAs.                      |
//| Keep TradecopyBridge.mq4 attached as well: while this script runs|
//| it owns the connector socket and the EA stands by; when it stops |
//| the EA takes the socket back within one timer period (a new      |
//| session with a fresh snapshot).                                  |
//+------------------------------------------------------------------+
#property copyright "tradecopy"
#property version   "1.00"
#property strict
#property show_inputs
#property description "tradecopy bridge loop: ~1 ms command pickup and trade detection for MT4."

#include <Tradecopy\TcMt4Terminal.mqh>

input string       InpEndpoint         = "tcp://127.0.0.1:5555"; // Connector endpoint (ROUTER)
input string       InpToken            = "";                     // Token (sent in hello)
input string       InpServerKey        = "";                     // Connector's CURVE public key (Z85, 40 chars)
input string       InpPublicKey        = "";                     // This terminal's CURVE public key (Z85)
input string       InpSecretKey        = "";                     // This terminal's CURVE secret key (Z85)
input bool         InpPlaintext        = false;                  // Allow no encryption (trusted loopback only)
input string       InpAccountId        = "";                     // Account id ("" = account number)
input ENUM_TC_ROLE InpRole             = TC_ROLE_BOTH;           // Role
input int          InpMagic            = 0;                      // Magic for copies when the command has none
input int          InpDeviationPoints  = 20;                     // Slippage, points (when the command has none)
input bool         InpStopsAfterFill   = false;                  // Market-execution account: set SL/TP after the fill
input bool         InpDedupByComment   = true;                   // Never open a second copy with the same comment
input int          InpRecoverDays      = 7;                      // History searched for earlier copies (days)
input int          InpHeartbeatMs      = 1000;                   // Heartbeat until the connector's welcome sets it
input int          InpAccountMs        = 1000;                   // Account updates at most every (ms)
input int          InpPollMs           = 1;                      // zmq_poll timeout = scan period when idle (ms)
input string       InpSymbols          = "";                     // Snapshot symbols ("" = Market Watch), comma separated

CTcMt4Terminal  g_term;
CTcBridge       g_bridge;
CTcOwnerLock    g_lock;

void OnStart()
  {
   if(!MQLInfoInteger(MQL_DLLS_ALLOWED))
     {
      Alert("tradecopy: enable 'Allow DLL imports' for TradecopyLoop (libzmq.dll)");
      return;
     }
   //--- before asking the EA for the link: a loop that cannot connect must not stop one that can
   string curve = TcCurveInputsProblem(InpServerKey, InpPublicKey, InpSecretKey, InpPlaintext);
   if(curve != "")
     {
      Alert("tradecopy: " + curve);
      return;
     }
   int login = AccountNumber();
   while(login == 0 && !IsStopped())
     {
      Sleep(100);
      login = AccountNumber();
     }
   if(IsStopped())
      return;
   string account = StringLen(InpAccountId) > 0 ? InpAccountId : IntegerToString(login);

   //--- ask the EA (if attached) for the socket; it hands over on its next timer event
   g_lock.Init(IntegerToString(login), TC_KIND_SCRIPT);
   g_lock.RequestOwnership();
   ulong asked = TcNowMs();
   bool told = false;
   while(!IsStopped() && !g_lock.TryAcquire())
     {
      g_lock.RequestOwnership();   // keeps the request fresh while we wait
      if(!told && TcNowMs() - asked > 2000)
        {
         told = true;
         Print("tradecopy loop: waiting for the current owner of the connector link to hand over");
        }
      Sleep(5);
     }
   if(IsStopped())
     {
      g_lock.CancelRequest();
      return;
     }

   TcRefreshServerOffset();
   g_term.Init(account, InpMagic, InpDeviationPoints, InpSymbols, InpRecoverDays, InpStopsAfterFill);
   string events[];
   ArrayResize(events, 0);
   g_term.Scan(events, false);   // baseline
   g_bridge.SetCurve(InpServerKey, InpPublicKey, InpSecretKey, InpPlaintext);
   g_bridge.Start(GetPointer(g_term), InpEndpoint, InpToken, account, InpRole, InpHeartbeatMs, InpAccountMs, InpDedupByComment);
   PrintFormat("tradecopy loop: serving account %s, poll %d ms", account, InpPollMs);

   bool reports = TcRoleReports(InpRole);
   ulong last_status = 0;
   while(!IsStopped())
     {
      bool unused = false;
      //--- blocks until a frame arrives or InpPollMs passes, then reads/answers/flushes
      g_bridge.Wait((int)MathMax(0, InpPollMs), 0, unused);
      TcRefreshServerOffset();
      ArrayResize(events, 0);
      g_term.Scan(events, reports);
      for(int i = 0; i < ArraySize(events); i++)
         g_bridge.EnqueueEvent(events[i]);
      g_lock.Beat();
      ulong now = TcNowMs();
      if(now - last_status >= 500)
        {
         last_status = now;
         Comment(g_bridge.Status());
         if(AccountNumber() != login)
           {
            Print("tradecopy loop: the terminal switched accounts; stopping (restart the script)");
            break;
           }
        }
     }
   g_bridge.Stop();
   g_term.Shutdown();
   g_lock.Release();
   Comment("");
  }
//+------------------------------------------------------------------+
