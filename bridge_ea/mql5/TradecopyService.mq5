//+------------------------------------------------------------------+
//| TradecopyService.mq5 - tradecopy bridge as an MT5 service        |
//|                                                                  |
//| Why a service                                                    |
//|  An EA only runs when the terminal calls it: OnTimer fires every |
//|  10-16 ms at best on Windows and OnTick only on quotes, so a     |
//|  command that arrives just after a timer event waits for the     |
//|  next one. A service is a program with its own thread and a loop |
//|  of its own: here it blocks in zmq_poll on the connector socket, |
//|  and zmq_poll returns the moment a frame arrives, so a command is|
//|  picked up within microseconds and executed with OrderSend       |
//|  (services may trade in MT5). The poll timeout (InpPollMs, 1 ms) |
//|  only bounds how long the loop idles between its timers          |
//|  (heartbeats, account updates, reconnects).                      |
//|                                                                  |
//| The split with the EA                                            |
//|  Services receive no events at all - in particular no            |
//|  OnTradeTransaction, which is how MT5 reports master trades      |
//|  exactly (deal entry, reason, close-by pairs, triggered orders). |
//|  Polling history from the service would see the same facts later|
//|  and less precisely. So:                                         |
//|   * the service owns the connector socket (DEALER, identity      |
//|     <account>.<session>.<n>), the session, snapshots, heartbeats |
//|     and the execution of commands;                               |
//|   * TradecopyBridge (EA on any chart) keeps classifying          |
//|     OnTradeTransaction and forwards each event over a local      |
//|     ZeroMQ PUSH socket to this service's PULL socket; the service|
//|     stamps them into its session like its own frames. zmq_poll   |
//|     waits on both sockets, so a forwarded event also leaves      |
//|     without delay.                                               |
//|  A follower-only account needs no EA at all.                     |
//|  The service asks the EA for the socket at start (CTcOwnerLock); |
//|  when the service stops, the EA takes the socket back.           |
//+------------------------------------------------------------------+
#property service
#property copyright "tradecopy"
#property version   "1.00"
#property description "tradecopy bridge service: owns the connector link, executes copy commands."

#include <Tradecopy\TcMt5Terminal.mqh>

input string       InpEndpoint         = "tcp://127.0.0.1:5555"; // Connector endpoint (ROUTER)
input string       InpToken            = "";                     // Token (sent in hello)
input string       InpServerKey        = "";                     // Connector's CURVE public key (Z85, 40 chars)
input string       InpPublicKey        = "";                     // This terminal's CURVE public key (Z85)
input string       InpSecretKey        = "";                     // This terminal's CURVE secret key (Z85)
input bool         InpPlaintext        = false;                  // Allow no encryption (trusted loopback only)
input string       InpAccountId        = "";                     // Account id ("" = login number)
input ENUM_TC_ROLE InpRole             = TC_ROLE_BOTH;           // Role
input long         InpMagic            = 0;                      // Magic for copies when the command has none
input int          InpDeviationPoints  = 20;                     // Max slippage, points (when the command has none)
input bool         InpDedupByComment   = true;                   // Never open a second copy with the same comment
input int          InpRecoverDays      = 7;                      // History searched for earlier copies (days)
input int          InpHeartbeatMs      = 1000;                   // Heartbeat until the connector's welcome sets it
input int          InpAccountMs        = 1000;                   // Account updates at most every (ms)
input int          InpPollMs           = 1;                      // zmq_poll timeout (ms): idle bound, not pickup latency
input string       InpSymbols          = "";                     // Snapshot symbols ("" = Market Watch), comma separated
input string       InpServiceEndpoint  = "";                     // EA -> service endpoint ("" = derived from the login)

CTcMt5Terminal  g_term;
CTcBridge       g_bridge;
CTcOwnerLock    g_lock;
CTcZmqContext   g_ctx;
CTcSocket       g_pull;
uchar           g_buf[];

string ServiceEndpoint(const long login)
  {
   if(StringLen(InpServiceEndpoint) > 0)
      return InpServiceEndpoint;
   return "tcp://127.0.0.1:" + IntegerToString(47000 + (int)(login % 10000));
  }

//--- the EA's forwarded frames: "<login>\n<tag>\n<tail>"
void DrainEa(const long login, ulong &last_ea)
  {
   string me = IntegerToString(login);
   for(int k = 0; k < 1000; k++)
     {
      int n = g_pull.Recv(g_buf);
      if(n == TC_RECV_NONE)
         break;
      if(n == TC_RECV_ERROR)
        {
         Print("tradecopy service: local socket error ", g_pull.LastErrno());
         break;
        }
      if(n < 0)
         continue;
      string msg = CharArrayToString(g_buf, 0, n, CP_UTF8);
      int a = StringFind(msg, "\n");
      int b = (a >= 0) ? StringFind(msg, "\n", a + 1) : -1;
      if(a < 0 || b < 0)
         continue;
      string from = StringSubstr(msg, 0, a);
      if(from != me)
        {
         //--- a terminal of another account using the same local endpoint: never mix accounts
         Print("tradecopy service: ignored a frame from account ", from, " on ", ServiceEndpoint(login),
               " - give each terminal its own InpServiceEndpoint");
         continue;
        }
      last_ea = TcNowMs();
      string tag = StringSubstr(msg, a + 1, b - a - 1);
      if(tag == "event" && TcRoleReports(InpRole))
         g_bridge.EnqueueEvent(StringSubstr(msg, b + 1));
      else
         if(tag == "result")
            g_bridge.EnqueueCarried(tag, StringSubstr(msg, b + 1));   // handed over unanswered
     }
  }

//--- serve one account until the service stops or the terminal logs into another account
void RunAccount(const long login)
  {
   string account = StringLen(InpAccountId) > 0 ? InpAccountId : IntegerToString(login);
   g_lock.Init(IntegerToString(login), TC_KIND_SERVICE);
   g_lock.RequestOwnership();
   ulong asked = TcNowMs();
   bool told = false;
   while(!IsStopped() && !g_lock.TryAcquire())
     {
      g_lock.RequestOwnership();   // keeps the request fresh while we wait
      if(!told && TcNowMs() - asked > 2000)
        {
         told = true;
         PrintFormat("tradecopy service: waiting for the current owner (kind %d) of account %s to hand over",
                     g_lock.OwnerKind(), account);
        }
      Sleep(10);
     }
   if(IsStopped())
     {
      g_lock.CancelRequest();
      return;
     }
   TcRefreshServerOffset();
   g_term.Init(InpMagic, InpDeviationPoints, InpSymbols, InpRecoverDays);
   ArrayResize(g_buf, TC_RX_BUFFER);
   string local = ServiceEndpoint(login);
   if(!g_pull.Open(g_ctx.Get(), TC_ZMQ_PULL, "", false) || !g_pull.Bind(local))
     {
      PrintFormat("tradecopy service: cannot bind %s (errno %d): trade events from TradecopyBridge will not arrive",
                  local, g_pull.LastErrno());
      g_pull.Close();
     }
   g_bridge.SetCurve(InpServerKey, InpPublicKey, InpSecretKey, InpPlaintext);
   g_bridge.Start(GetPointer(g_term), InpEndpoint, InpToken, account, InpRole, InpHeartbeatMs, InpAccountMs, InpDedupByComment);
   PrintFormat("tradecopy service: serving account %s (login %I64d), EA events on %s, poll %d ms",
               account, login, local, InpPollMs);

   ulong last_ea = 0;
   ulong last_check = 0;
   bool warned = false;
   while(!IsStopped())
     {
      bool ea_ready = false;
      g_bridge.Wait((int)MathMax(0, InpPollMs), g_pull.IsOpen() ? g_pull.Handle() : 0, ea_ready);
      if(ea_ready)
         DrainEa(login, last_ea);
      g_lock.Beat();
      ulong now = TcNowMs();
      if(now - last_check >= 1000)
        {
         last_check = now;
         TcRefreshServerOffset();
         if(AccountInfoInteger(ACCOUNT_LOGIN) != login)
           {
            Print("tradecopy service: the terminal switched accounts; starting over");
            break;
           }
         //--- a master without the EA reports nothing but heartbeats: say so once
         if(TcRoleReports(InpRole) && !warned && now - last_ea > 10000)
           {
            warned = true;
            Print("tradecopy service: no TradecopyBridge EA is forwarding trade events; attach it to a chart "
                  "(the state hash still makes the connector resync, but events are what it copies)");
           }
         if(now - last_ea <= 10000)
            warned = false;
        }
     }
   g_bridge.Stop();
   g_pull.Close();
   g_lock.Release();
  }

void OnStart()
  {
   if(!MQLInfoInteger(MQL_DLLS_ALLOWED))
     {
      Print("tradecopy service: enable 'Allow DLL imports' in the service's properties (libzmq.dll)");
      return;
     }
   //--- before taking the link from the EA: a service that cannot connect must not stop one that can
   string curve = TcCurveInputsProblem(InpServerKey, InpPublicKey, InpSecretKey, InpPlaintext);
   if(curve != "")
     {
      Print("tradecopy service: not starting: " + curve);
      return;
     }
   if(!MQLInfoInteger(MQL_TRADE_ALLOWED))
      Print("tradecopy service: 'Allow Algo Trading' is off for this service: commands will be refused");
   while(!IsStopped())
     {
      //--- at terminal start the service can run before the login is known
      long login = AccountInfoInteger(ACCOUNT_LOGIN);
      if(login == 0)
        {
         Sleep(100);
         continue;
        }
      RunAccount(login);
     }
   g_ctx.Term();
  }
//+------------------------------------------------------------------+
